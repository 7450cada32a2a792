"""Triton backend of the two fused ops (the contract of csrc/us_jepa_ops.cpp). R = M*B*K rows, s bytes/element:
    masked_gather:  out[r] = x[b, idx[r]], r = (m*B + b)*K + k                         bytes 2*R*D*s
    backward:       dx[b, idx[r]] += grad[r] (float32 atomics: indices repeat)       bytes R*D*s + B*N*D*s (min)
    salt_loss:      y = layer_norm(feats[b, idx[r]]) (no affine, eps 1e-5, float32 statistics)
                    loss = sum_{r,d} l(pred[r,d] - y_d) / (R*D),  grad_pred = l'(pred - y) / (R*D)   bytes 3*R*D*s
Registered as `us_jepa_triton::*` with torch.library.custom_op + register_fake + register_autograd
(_register.py, shared with the C++/CUDA ops): the path that passes opcheck and torch.compile both on
a GPU and, for CI, under the Triton interpreter on CPU (`TRITON_INTERPRET=1` set before this module
is imported).

Each program handles ROWS rows x BLOCK_D (next power of two >= D) columns, ~4K elements: many rows per
program keep the interpreter fast (it costs ~1 ms a program) and give the GPU enough bytes in flight."""
import torch
import triton
import triton.language as tl

from . import check_indices, host_checks_indices
from ._register import register

EPS = tl.constexpr(1e-5)  # F.layer_norm's default, as the reference; constexpr: a jitted kernel may read no other global


@triton.jit
def _tile(idx_ptr, R, B, K, N, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile of every kernel: ROWS target rows r = (m*B + b)*K + k by BLOCK_D columns (inlined by
    Triton). Returns the columns, the tile's mask (rows < R, cols < D), each row's token n = idx[r]
    and image b (int64, so offsets into large tensors do not overflow) and the tile's offsets in a
    contiguous (R, D)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < D)
    n = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    # CUDA inputs are not range-checked on the host (that would sync): this assert fires only in
    # kernels compiled with debug (TRITON_DEBUG=1). CPU inputs (the interpreter) are checked on the
    # host.
    tl.device_assert((n >= 0) & (n < N), "masked_gather/salt_loss: index out of range")
    b = ((rows // K) % B).to(tl.int64)
    off = rows[:, None].to(tl.int64) * D + cols[None, :]
    return cols, mask, n, b, off


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, R, B, K, N, D, sxb, sxn, sxd,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    cols, mask, n, b, off = _tile(idx_ptr, R, B, K, N, D, ROWS, BLOCK_D)
    v = tl.load(x_ptr + (b * sxb + n * sxn)[:, None] + cols[None, :].to(tl.int64) * sxd, mask=mask)
    tl.store(out_ptr + off, v, mask=mask)


@triton.jit
def _scatter_add_kernel(g_ptr, idx_ptr, acc_ptr, R, B, K, N, D,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    cols, mask, n, b, off = _tile(idx_ptr, R, B, K, N, D, ROWS, BLOCK_D)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    # indices repeat across masks: atomics
    tl.atomic_add(acc_ptr + (b * N + n)[:, None] * D + cols[None, :], g, mask=mask)


@triton.jit
def _salt_kernel(p_ptr, f_ptr, idx_ptr, g_ptr, part_ptr, R, B, K, N, D, sfb, sfn, sfd, beta, inv,
                 KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    cols, mask, n, b, off = _tile(idx_ptr, R, B, K, N, D, ROWS, BLOCK_D)
    t = tl.load(f_ptr + (b * sfb + n * sfn)[:, None] + cols[None, :].to(tl.int64) * sfd, mask=mask,
                other=0.0).to(tl.float32)  # (ROWS, BLOCK_D) teacher rows, float statistics
    mean = tl.sum(t, 1) / D
    c = tl.where(mask, t - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(c * c, 1) / D + EPS)
    p = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
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
    tl.store(g_ptr + off, (grad * inv).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(tl.where(mask, loss, 0.0), 1), 0))


def _check_index(idx, x, n, op):
    """idx (M, B, K) int64/int32 on x's device, returned contiguous. Its range is checked on the
    host only where that costs no device->host sync (kernels.host_checks_indices): always for CPU
    tensors, where the interpreter would corrupt the heap on an out-of-bounds access; for CUDA
    tensors the caller validates (kernels.check_indices on the CPU indices), or sets
    US_JEPA_CHECK_INDICES=1 to debug."""
    if idx.dim() != 3 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: idx must be an int64/int32 (M, B, K) tensor, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    if idx.device != x.device:
        raise ValueError(f"{op}: idx is on {idx.device} but the data on {x.device}")
    if host_checks_indices(idx):
        check_indices(idx, n, op=op, allow_sync=True)
    return idx.contiguous()


def _index_rows(data, idx, n, op):
    """What every op starts from (index_rows in csrc/common.h): idx checked and contiguous, its
    sizes M, B, K and the data's D: R = M*B*K rows r = (m*B + b)*K + k of D channels, from images of
    n tokens."""
    idx = _check_index(idx, data, n, op)
    M, B, K = idx.shape
    return idx, M, B, K, data.shape[2]


def _check_float(t, op):
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: the triton backend takes float32, bfloat16 or float16, got {t.dtype}")


def _launch(R, D):
    block_d = triton.next_power_of_2(max(D, 1))
    rows = max(1, min(64, 4096 // block_d))  # ~4K elements a program: D = 768 -> 4 rows of 1024 lanes
    return (triton.cdiv(R, rows),), rows, block_d


# The host side of each op is a plain function (registered below with custom_op), so that a test can
# run it on fake CUDA tensors and see that it never reads a value back to the host.
def gather_impl(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (M, B, K) -> (M*B, K, D), out[m*B + b, k] = x[b, idx[m, b, k]]."""
    _check_float(x, "masked_gather")
    if x.dim() != 3 or idx.dim() != 3 or idx.shape[1] != x.shape[0]:
        raise ValueError(f"masked_gather: need x (B, N, D) and idx (M, B, K), "
                         f"got {tuple(x.shape)}, {tuple(idx.shape)}")
    idx, M, B, K, D = _index_rows(x, idx, x.shape[1], "masked_gather")
    out = x.new_empty(M * B, K, D)
    if out.numel():
        grid, rows, block_d = _launch(M * B * K, D)
        _gather_kernel[grid](x, idx, out, M * B * K, B, K, x.shape[1], D, *x.stride(),
                             ROWS=rows, BLOCK_D=block_d)
    return out


def gather_backward_impl(grad: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """grad (M*B, K, D) -> (B, n, D): scatter-add (indices repeat across masks), float32 accumulation."""
    _check_float(grad, "masked_gather_backward")
    want = (idx.shape[0] * idx.shape[1], idx.shape[2]) if idx.dim() == 3 else None  # (M*B, K)
    if grad.dim() != 3 or grad.shape[:2] != want:
        raise ValueError(f"masked_gather_backward: need grad (M*B, K, D) and idx (M, B, K), "
                         f"got {tuple(grad.shape)}, {tuple(idx.shape)}")
    idx, M, B, K, D = _index_rows(grad, idx, n, "masked_gather_backward")
    acc = torch.zeros(B, n, D, device=grad.device, dtype=torch.float32)
    if grad.numel():
        grid, rows, block_d = _launch(M * B * K, D)
        _scatter_add_kernel[grid](grad.contiguous(), idx, acc, M * B * K, B, K, n, D,
                                  ROWS=rows, BLOCK_D=block_d)
    return acc.to(grad.dtype)


def salt_loss_impl(pred: torch.Tensor, feats: torch.Tensor, idx: torch.Tensor, beta: float,
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
        raise ValueError(f"salt_loss: need kind in 0/1/2, beta >= 0 and at least one token "
                         f"(kind={kind}, beta={beta})")
    idx, M, B, K, D = _index_rows(feats, idx, feats.shape[1], "salt_loss")
    R = M * B * K
    pred = pred.contiguous()
    grad = torch.empty_like(pred)
    grid, rows, block_d = _launch(R, D)
    part = torch.empty(grid[0], device=pred.device, dtype=torch.float32)  # one partial sum per program
    _salt_kernel[grid](pred, feats, idx, grad, part, R, B, K, feats.shape[1], D, *feats.stride(),
                       float(beta), 1.0 / (R * D), KIND=kind, ROWS=rows, BLOCK_D=block_d)
    return part.sum() / (R * D), grad


custom_op = torch.library.custom_op
masked_gather = custom_op("us_jepa_triton::masked_gather", gather_impl, mutates_args=())
masked_gather_backward = custom_op("us_jepa_triton::masked_gather_backward", gather_backward_impl,
                                   mutates_args=())
salt_loss_fwd = custom_op("us_jepa_triton::salt_loss", salt_loss_impl, mutates_args=())
register("us_jepa_triton")
