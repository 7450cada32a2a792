import os, sys

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU only in the interpreter, which must be chosen
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/triton_ops.py is imported

# The preprocessing cache of the whole session in one temporary folder (subprocesses inherit it), not ~/.cache.
os.environ.setdefault("US_JEPA_CACHE", os.path.join(__import__("tempfile").mkdtemp(prefix="us_jepa_cache_")))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))

import us_jepa  # noqa: E402


@pytest.fixture
def tiny_args(tmp_path):
    """Flags for a run that takes seconds: a small pool, few steps, frequent checkpoints."""
    def make(out, steps=6, extra=()):
        return ["--n_images", "160", "--batch_size", "16", "--steps", str(steps), "--eval_every", "3",
                "--log_every", "3", "--out", str(tmp_path / out), "--depth", "2", "--pred_depth", "1",
                *extra]
    return make
