"""The C++/CUDA extension (csrc/): built with ninja on first use, registered as torch ops `us_jepa_ext::*`.

One schema, two implementations: CPU (us_jepa_ops.cpp, always built) and CUDA (us_jepa_ops.cu, built when
torch is a CUDA build and a CUDA toolkit is found: decided from `torch.version.cuda` and the toolkit, never
from whether a GPU is visible). In Python, as in pytorch/extension-cpp: `register_fake` (shapes for
torch.compile / meta tensors) and `register_autograd`, shared with the Triton ops (_register.py)."""
import os

import torch
from torch.utils import cpp_extension

from ._register import register

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_state = {}  # "ok": bool, "cuda": bool, "error": str


def cuda_toolkit():
    """The CUDA build happens when torch is a CUDA build and nvcc is there (cpp_extension finds CUDA_HOME)."""
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def load(verbose=False):
    """Build (once, cached by torch in TORCH_EXTENSIONS_DIR) and load the extension. Returns None if it works,
    else the reason as one line."""
    if _state:
        return _state.get("error")
    sources = [os.path.join(CSRC, "us_jepa_ops.cpp")]
    with_cuda = cuda_toolkit()
    if with_cuda:
        sources.append(os.path.join(CSRC, "us_jepa_ops.cu"))
        if not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no GPU to ask: Ampere and Hopper (H100/H200 = sm_90)
    try:
        cpp_extension.load(name="us_jepa_ext" + ("_cuda" if with_cuda else ""), sources=sources,
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                           is_python_module=False, verbose=verbose)
    except Exception as e:  # no compiler, no ninja, a failed build: the caller falls back or raises with this
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1:] or ["unknown error"]
        _state.update(ok=False, error=f"the C++ extension did not build ({type(e).__name__}: {last[0][:200]})")
        return _state["error"]
    _state.update(ok=True, cuda=with_cuda)
    register("us_jepa_ext")
    return None


def has_cuda():
    return _state.get("ok", False) and _state.get("cuda", False)
