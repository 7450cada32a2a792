"""Fused masked-gather and SALT-loss ops for us_jepa.py: one contract, several backends.

    masked_gather(x, idx)  x (B, N, D), idx (M, B, K) int -> (M*B, K, D),  out[m*B + b, k] = x[b, idx[m, b, k]]
        (mask-major, exactly I-JEPA's apply_masks); its backward is a scatter-ADD, since indices repeat across
        masks.
    salt_loss(pred, feats, idx, kind="smooth_l1", beta=1.0)  pred (M*B, K, D), feats (B, N, D) without grad
        -> mean over tokens r = (m, b, k) and channels d of  l(pred[r, d] - layer_norm(feats[b, idx[m, b, k]])[d])
        with layer_norm without affine (eps 1e-5, float32 statistics) and l = Smooth-L1(beta) | L1 | L2.
        The gathered, normalised targets are never written to memory; the forward pass also computes the
        gradient w.r.t. pred, which backward scales by the incoming gradient on the device. Only the scalar mean
        is supported (no reduction='none').

Backends (the references are us_jepa.apply_masks and us_jepa.salt_loss, in plain PyTorch):
    cpp     the C++ extension in csrc/, CPU (JIT-built with ninja on first use, ~10 s, then cached)
    cuda    the same extension's CUDA implementation (when torch is a CUDA build and nvcc is found)
    triton  triton_ops.py; on a GPU, or on CPU only under TRITON_INTERPRET=1 (for tests)
This package never imports us_jepa.

Index ranges: every backend raises "index out of range" for CPU tensors. For CUDA tensors the ops do
not check on the host, since reading min/max back costs one device->host sync per call: the caller
validates the indices once where they are made, on the CPU, with check_indices(idx, n), before
copying them to the GPU. The CUDA kernels also assert on the device (a failure is "device-side
assert triggered", after which the CUDA context is unusable); Triton's only under TRITON_DEBUG=1.
US_JEPA_CHECK_INDICES=1 restores the host check (with its sync) on CUDA, for debugging."""
import os

import torch

BACKENDS = ("cuda", "triton", "cpp")
KINDS = {"smooth_l1": 0, "l1": 1, "l2": 2}
CHECK_ENV = "US_JEPA_CHECK_INDICES"  # =1: range-check CUDA indices on the host too (a sync a call)


def check_indices(idx, n, op="check_indices", allow_sync=False):
    """Raise IndexError unless every entry of the integer tensor idx lies in [0, n). For the CPU
    indices the sampler makes, once per step before they go to the GPU: cheap (one pass over M*B*K
    integers). On another device it would read two numbers back to the host (a sync), so it refuses
    unless allow_sync."""
    if idx.device.type != "cpu" and not allow_sync:
        raise ValueError(f"{op}: idx is on {idx.device}; check the CPU indices before copying them "
                         f"(on {idx.device.type} this check would cost a device->host sync)")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"{op}: idx must be an integer tensor, got {idx.dtype}")
    if idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    lo = int(lo)
    hi = int(hi)
    if lo < 0 or hi >= n:
        raise IndexError(f"{op}: index out of range: idx holds values in [{lo}, {hi}] "
                         f"but must lie in [0, {n})")


def host_checks_indices(idx):
    """Whether the ops range-check idx on the host: for CPU tensors always (no sync there); for
    others only under US_JEPA_CHECK_INDICES=1. csrc/common.h decides the same way for the C++/CUDA
    ops."""
    return idx.device.type == "cpu" or os.environ.get(CHECK_ENV) == "1"


class Ops:
    """The two ops of one backend, called like the references in us_jepa.py."""
    def __init__(self, name, gather_op, salt_op):
        self.name, self._gather, self._salt = name, gather_op, salt_op

    def masked_gather(self, x, idx):
        return self._gather(x, idx)

    def salt_loss(self, pred, feats, idx, kind="smooth_l1", beta=1.0):
        if kind not in KINDS: raise ValueError(f"salt_loss: kind must be one of {list(KINDS)}, got {kind!r}")
        if feats.requires_grad:  # the fused backward returns no gradient for the targets: refuse, don't drop it
            raise ValueError("salt_loss: feats must not require grad (they are the frozen teacher's features)")
        if pred.dtype != feats.dtype:  # e.g. bf16 predictions (autocast) against float32 teacher features: the
            pred, feats = pred.float(), feats.float()  # kernels take one dtype; the reference computes in float32
        return self._salt(pred, feats, idx, float(beta), KINDS[kind])[0]


def why_not(name, device):
    """None if backend `name` can run on tensors of `device`, else the reason in one line."""
    device = torch.device(device)
    if name == "cpp":
        return "cpp is the CPU implementation; use cuda on a GPU" if device.type != "cpu" else _ext_error()
    if name == "cuda":
        if device.type != "cuda": return "cuda needs CUDA tensors"
        if torch.version.cuda is None: return "torch is a CPU build, so the CUDA extension cannot be built"
        from . import ext
        return _ext_error() or (None if ext.has_cuda() else "no CUDA toolkit (nvcc) was found to build the extension")
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type == "cpu" and not interp:
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before import; slow, for tests)"
        if device.type == "cuda" and interp:
            return "TRITON_INTERPRET=1 is set, so triton would not run on the GPU"
        return None if device.type in ("cpu", "cuda") else f"triton does not run on {device.type}"
    return f"unknown backend {name!r} (choose from auto, {', '.join(BACKENDS)}; torch = the plain references)"


def _ext_error():
    from . import ext
    return ext.load()


def get(name, device):
    """The Ops of backend `name` for tensors on `device`; raises RuntimeError with the reason if it cannot run."""
    reason = why_not(name, device)
    if reason: raise RuntimeError(f"kernels backend {name!r} cannot run here: {reason}")
    if name == "triton":
        from . import triton_ops as t
        return Ops(name, t.masked_gather, t.salt_loss_fwd)
    ops = torch.ops.us_jepa_ext
    return Ops(name, ops.masked_gather, ops.salt_loss)


_said = set()


def select(name, device):
    """What `--kernels NAME` means: 'auto' -> auto(device), saying its choice once per process (None means the
    torch references); another name -> get(name, device), which raises with the reason if it cannot run."""
    if name != "auto": return get(name, device)
    ops, line = auto(device)
    if line not in _said: print(f"[{line}]", flush=True); _said.add(line)
    return ops


def auto(device):
    """The fastest backend that runs on `device`: cpp on a CPU (measured, BENCHMARKS.md); on a GPU cuda, then
    triton, an order not yet measured (no GPU so far). Returns (Ops or None, one line saying what and why)."""
    order = ("cuda", "triton") if torch.device(device).type == "cuda" else ("cpp",)
    reasons = []
    for name in order:
        r = why_not(name, device)
        if r is None: return get(name, device), f"kernels: {name}"
        reasons.append(f"{name}: {r}")
    return None, f"kernels: torch reference ({'; '.join(reasons)})"
