"""Triton backend of the two fused ops (the contract of csrc/us_jepa_ops.cpp). R = M*B*K rows, s bytes/element:
    masked_gather:  out[r] = x[b, idx[r]], r = (m*B + b)*K + k                         bytes 2*R*D*s
    backward:       dx[b, idx[r]] += grad[r] (float32 atomics: indices repeat)       bytes R*D*s + B*N*D*s (min)
    salt_loss:      y = layer_norm(feats[b, idx[r]]) (no affine, eps 1e-5, float32 statistics)
                    loss = sum_{r,d} l(pred[r,d] - y_d) / (R*D),  grad_pred = l'(pred - y) / (R*D)   bytes 3*R*D*s
Registered as `us_jepa_triton::*` with torch.library.custom_op + register_fake
+ register_autograd: the path that passes opcheck and torch.compile both on a GPU and, for CI, under the
Triton interpreter on CPU (`TRITON_INTERPRET=1` set before this module is imported).

Each program handles ROWS rows x BLOCK_D (next power of two >= D) columns, ~4K elements: many rows per
program keep the interpreter fast (it costs ~1 ms a program) and give the GPU enough bytes in flight."""
import torch
import triton
import triton.language as tl

EPS = tl.constexpr(1e-5)  # F.layer_norm's default, as the reference; constexpr: a jitted kernel may read no other global


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, R, B, K, N, D, sxb, sxn, sxd,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # output rows r = (m*B + b)*K + k
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    n = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)  # range checked on the host
    b = ((rows // K) % B).to(tl.int64)
    m2 = rmask[:, None] & (cols[None, :] < D)
    v = tl.load(x_ptr + (b * sxb + n * sxn)[:, None] + cols[None, :].to(tl.int64) * sxd, mask=m2)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], v, mask=m2)


@triton.jit
def _scatter_add_kernel(g_ptr, idx_ptr, acc_ptr, R, B, K, N, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    n = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    b = ((rows // K) % B).to(tl.int64)
    m2 = rmask[:, None] & (cols[None, :] < D)
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.atomic_add(acc_ptr + (b * N + n)[:, None] * D + cols[None, :], g, mask=m2)  # indices repeat: atomics


@triton.jit
def _salt_kernel(p_ptr, f_ptr, idx_ptr, g_ptr, part_ptr, R, B, K, N, D, sfb, sfn, sfd, beta, inv,
                 KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    m2 = rmask[:, None] & (cols[None, :] < D)
    n = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    b = ((rows // K) % B).to(tl.int64)
    t = tl.load(f_ptr + (b * sfb + n * sfn)[:, None] + cols[None, :].to(tl.int64) * sfd, mask=m2,
                other=0.0).to(tl.float32)  # (ROWS, BLOCK_D) teacher rows, float statistics
    mean = tl.sum(t, 1) / D
    c = tl.where(m2, t - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(c * c, 1) / D + EPS)
    off = rows[:, None].to(tl.int64) * D + cols[None, :]
    p = tl.load(p_ptr + off, mask=m2, other=0.0).to(tl.float32)
    diff = p - c * rstd[:, None]
    ad = tl.abs(diff)
    sgn = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    if KIND == 2:
        loss, grad = diff * diff, 2.0 * diff
    elif KIND == 1:
        loss, grad = ad, sgn
    else:  # Smooth-L1; beta = 0 never takes the quadratic branch, so it is L1 (as torch)
        quad = ad < beta
        loss = tl.where(quad, 0.5 * diff * diff / tl.where(quad, beta, 1.0), ad - 0.5 * beta)
        grad = tl.where(quad, diff / tl.where(quad, beta, 1.0), sgn)
    tl.store(g_ptr + off, (grad * inv).to(g_ptr.dtype.element_ty), mask=m2)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(tl.where(m2, loss, 0.0), 1), 0))


def _check_index(idx, x, n, op):
    """The interpreter does not catch out-of-bounds accesses and a GPU would read garbage: check here."""
    if idx.dim() != 3 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: idx must be an int64/int32 (M, B, K) tensor, got {idx.dtype} {tuple(idx.shape)}")
    if idx.device != x.device:
        raise ValueError(f"{op}: idx is on {idx.device} but the data on {x.device}")
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        lo, hi = int(lo), int(hi)  # one sync on a GPU: the price of never touching memory outside x
        if lo < 0 or hi >= n:
            raise IndexError(f"{op}: index out of range: idx holds values in [{lo}, {hi}] but must lie in [0, {n})")
    return idx.contiguous()


def _check_float(t, op):
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: the triton backend takes float32, bfloat16 or float16, got {t.dtype}")


def _launch(R, D):
    block_d = triton.next_power_of_2(max(D, 1))
    rows = max(1, min(64, 4096 // block_d))  # ~4K elements a program: D = 768 -> 4 rows of 1024 lanes
    return (triton.cdiv(R, rows),), rows, block_d


@torch.library.custom_op("us_jepa_triton::masked_gather", mutates_args=())
def masked_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (M, B, K) -> (M*B, K, D), out[m*B + b, k] = x[b, idx[m, b, k]]."""
    _check_float(x, "masked_gather")
    if x.dim() != 3 or idx.dim() != 3 or idx.shape[1] != x.shape[0]:
        raise ValueError(f"masked_gather: need x (B, N, D) and idx (M, B, K), got {tuple(x.shape)}, {tuple(idx.shape)}")
    B, N, D = x.shape
    idx = _check_index(idx, x, N, "masked_gather")
    M, _, K = idx.shape
    out = x.new_empty(M * B, K, D)
    if out.numel():
        grid, rows, block_d = _launch(M * B * K, D)
        _gather_kernel[grid](x, idx, out, M * B * K, B, K, N, D, *x.stride(), ROWS=rows, BLOCK_D=block_d)
    return out


@masked_gather.register_fake
def _(x, idx):
    return x.new_empty(idx.shape[0] * idx.shape[1], idx.shape[2], x.shape[2])


@torch.library.custom_op("us_jepa_triton::masked_gather_backward", mutates_args=())
def masked_gather_backward(grad: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """grad (M*B, K, D) -> (B, n, D): scatter-add (indices repeat across masks), float32 accumulation."""
    _check_float(grad, "masked_gather_backward")
    idx = _check_index(idx, grad, n, "masked_gather_backward")
    M, B, K = idx.shape
    if grad.shape[:2] != (M * B, K):
        raise ValueError(f"masked_gather_backward: grad {tuple(grad.shape)} does not match idx {tuple(idx.shape)}")
    D = grad.shape[2]
    acc = torch.zeros(B, n, D, device=grad.device, dtype=torch.float32)
    if grad.numel():
        grid, rows, block_d = _launch(M * B * K, D)
        _scatter_add_kernel[grid](grad.contiguous(), idx, acc, M * B * K, B, K, n, D, ROWS=rows, BLOCK_D=block_d)
    return acc.to(grad.dtype)


@masked_gather_backward.register_fake
def _(grad, idx, n):
    return grad.new_empty(idx.shape[1], n, grad.shape[2])


@torch.library.custom_op("us_jepa_triton::salt_loss", mutates_args=())
def salt_loss_fwd(pred: torch.Tensor, feats: torch.Tensor, idx: torch.Tensor, beta: float,
                  kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss, grad_pred): the mean loss (float32 scalar) and its gradient w.r.t. pred."""
    _check_float(pred, "salt_loss")
    if feats.dim() != 3 or idx.dim() != 3 or idx.shape[1] != feats.shape[0] or pred.shape != (
            idx.shape[0] * idx.shape[1], idx.shape[2], feats.shape[2]):
        raise ValueError(f"salt_loss: need pred (M*B, K, D), feats (B, N, D), idx (M, B, K), got "
                         f"{tuple(pred.shape)}, {tuple(feats.shape)}, {tuple(idx.shape)}")
    if pred.dtype != feats.dtype or pred.device != feats.device:
        raise ValueError(f"salt_loss: pred ({pred.dtype}, {pred.device}) and feats ({feats.dtype}, "
                         f"{feats.device}) must share dtype and device")
    if kind not in (0, 1, 2) or beta < 0 or pred.numel() == 0:
        raise ValueError(f"salt_loss: need kind in 0/1/2, beta >= 0 and at least one token (kind={kind}, beta={beta})")
    B, N, D = feats.shape
    idx = _check_index(idx, feats, N, "salt_loss")
    R = pred.shape[0] * pred.shape[1]
    pred = pred.contiguous()
    grad = torch.empty_like(pred)
    grid, rows, block_d = _launch(R, D)
    part = torch.empty(grid[0], device=pred.device, dtype=torch.float32)  # one partial sum per program
    _salt_kernel[grid](pred, feats, idx, grad, part, R, B, idx.shape[2], N, D, *feats.stride(), float(beta),
                       1.0 / (R * D), KIND=kind, ROWS=rows, BLOCK_D=block_d)
    return part.sum() / (R * D), grad


@salt_loss_fwd.register_fake
def _(pred, feats, idx, beta, kind):
    return pred.new_empty((), dtype=torch.float32), torch.empty_like(pred)


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1]); ctx.n = inputs[0].shape[1]


def _gather_bw_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _salt_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


masked_gather.register_autograd(lambda ctx, g: (masked_gather_backward(g, ctx.saved_tensors[0], ctx.n), None),
                                setup_context=_gather_setup)
masked_gather_backward.register_autograd(lambda ctx, g: (masked_gather(g, ctx.saved_tensors[0]), None, None),
                                         setup_context=_gather_bw_setup)
salt_loss_fwd.register_autograd(lambda ctx, g, _: (ctx.saved_tensors[0] * g, None, None, None, None),
                                setup_context=_salt_setup)
