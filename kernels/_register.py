"""register_fake and register_autograd for the three ops of one backend namespace, written once.

Both namespaces (`us_jepa_ext`, defined in csrc/us_jepa_ops.cpp, and `us_jepa_triton`, defined in
triton_ops.py) implement one schema:
    masked_gather(Tensor x, Tensor idx) -> Tensor                        (M*B, K, D)
    masked_gather_backward(Tensor grad, Tensor idx, int n) -> Tensor     (B, n, D)
    salt_loss(Tensor pred, Tensor feats, Tensor idx, float beta, int kind) -> (loss, grad_pred)
so their fake (shape-only) functions and autograd formulas are the same, given the namespace."""
import torch


def _gather_fake(x, idx):
    return x.new_empty(idx.shape[0] * idx.shape[1], idx.shape[2], x.shape[2])  # (M*B, K, D)


def _gather_backward_fake(grad, idx, n):
    return grad.new_empty(idx.shape[1], n, grad.shape[2])  # (B, n, D)


def _salt_fake(pred, feats, idx, beta, kind):
    # the loss is summed in float32 (float64 for float64 inputs, which only the C++/CUDA ops take)
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return pred.new_empty((), dtype=acc), torch.empty_like(pred)


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.n = inputs[0].shape[1]


def _gather_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _salt_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])  # grad_pred, computed by the forward pass


def _salt_backward(ctx, grad_loss, _unused):  # grad_pred is an output to save, not to use
    grad_pred = ctx.saved_tensors[0]
    # scaled on the device by the incoming gradient: no sync
    return grad_pred * grad_loss.to(grad_pred.dtype), None, None, None, None


def register(ns):
    """Register the fake functions and autograd formulas of `ns`::masked_gather,
    masked_gather_backward and salt_loss; the ops themselves must be defined already. Call once per
    namespace."""
    ops = getattr(torch.ops, ns)

    def gather_backward(ctx, grad):
        return ops.masked_gather_backward(grad, ctx.saved_tensors[0], ctx.n), None

    def gather_backward_backward(ctx, grad):  # linear in grad: its own backward is the gather again
        return ops.masked_gather(grad, ctx.saved_tensors[0]), None, None

    lib = torch.library
    lib.register_fake(f"{ns}::masked_gather", _gather_fake)
    lib.register_fake(f"{ns}::masked_gather_backward", _gather_backward_fake)
    lib.register_fake(f"{ns}::salt_loss", _salt_fake)
    lib.register_autograd(f"{ns}::masked_gather", gather_backward, setup_context=_gather_setup)
    lib.register_autograd(f"{ns}::masked_gather_backward", gather_backward_backward,
                          setup_context=_gather_backward_setup)
    lib.register_autograd(f"{ns}::salt_loss", _salt_backward, setup_context=_salt_setup)
