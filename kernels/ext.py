"""The C++/CUDA extension (csrc/): built with ninja on first use, registered as torch ops `us_jepa_ext::*`.

One schema, two implementations: CPU (us_jepa_ops.cpp, always built) and CUDA (us_jepa_ops.cu, built when
torch is a CUDA build and a CUDA toolkit is found: decided from `torch.version.cuda` and the toolkit, never
from whether a GPU is visible). Here, in Python: `register_fake` (shapes for torch.compile / meta tensors)
and `register_autograd`, as in pytorch/extension-cpp."""
import os

import torch
from torch.utils import cpp_extension

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
    _register()
    return None


def has_cuda():
    return _state.get("ok", False) and _state.get("cuda", False)


def _register():
    ops = torch.ops.us_jepa_ext

    @torch.library.register_fake("us_jepa_ext::masked_gather")
    def _(x, idx):
        return x.new_empty(idx.shape[0] * idx.shape[1], idx.shape[2], x.shape[2])

    @torch.library.register_fake("us_jepa_ext::masked_gather_backward")
    def _(grad, idx, n):
        return grad.new_empty(idx.shape[1], n, grad.shape[2])

    @torch.library.register_fake("us_jepa_ext::salt_loss")
    def _(pred, feats, idx, beta, kind):
        acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
        return pred.new_empty((), dtype=acc), torch.empty_like(pred)

    def gather_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1]); ctx.n = inputs[0].shape[1]

    def gather_backward(ctx, grad):
        return ops.masked_gather_backward(grad, ctx.saved_tensors[0], ctx.n), None

    def gather_bw_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def gather_bw_backward(ctx, grad):  # the backward is linear in grad: its own backward is the gather again
        return ops.masked_gather(grad, ctx.saved_tensors[0]), None, None

    def salt_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])  # grad_pred, computed by the forward pass
        ctx.dtype = inputs[0].dtype

    def salt_backward(ctx, grad_loss, _grad_of_grad_pred):  # grad_pred is an output for saving, not for use
        return (ctx.saved_tensors[0] * grad_loss.to(ctx.dtype), None, None, None, None)  # on device, no sync

    torch.library.register_autograd("us_jepa_ext::masked_gather", gather_backward, setup_context=gather_setup)
    torch.library.register_autograd("us_jepa_ext::masked_gather_backward", gather_bw_backward,
                                    setup_context=gather_bw_setup)
    torch.library.register_autograd("us_jepa_ext::salt_loss", salt_backward, setup_context=salt_setup)
