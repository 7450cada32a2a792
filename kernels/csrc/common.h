// Input checks shared by the CPU (us_jepa_ops.cpp) and CUDA (us_jepa_ops.cu) implementations of one schema.
// Every check is a TORCH_CHECK, so a bad input raises a Python RuntimeError with the message, never UB.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <c10/util/Exception.h>
#include <tuple>

namespace us_jepa_ext {

constexpr double kLayerNormEps = 1e-5;  // F.layer_norm's default: the reference in us_jepa.py uses it

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", s);
}

// idx (M, B, K) integer, on x's device, every entry in [0, n). Returns it as contiguous int64.
// The range check reads two numbers back to the host (one sync on CUDA): the price of never touching memory
// outside x; the kernels then need no bounds logic of their own for the row index.
inline at::Tensor check_index(const at::Tensor& idx, const at::Tensor& x, int64_t n, const char* op) {
  TORCH_CHECK(idx.dim() == 3, op, ": idx must be (M, B, K), got ", idx.dim(), " dims");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
              op, ": idx must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == x.device(), op, ": idx is on ", idx.device(), " but the data on ", x.device());
  if (idx.numel() > 0) {
    auto [lo, hi] = at::aminmax(idx);
    int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
    TORCH_CHECK(l >= 0 && h < n, op, ": index out of range: idx holds values in [", l, ", ", h,
                "] but must lie in [0, ", n, ")");
  }
  return idx.to(at::kLong).contiguous();
}

inline void check_gather(const at::Tensor& x, const at::Tensor& idx) {
  TORCH_CHECK(x.dim() == 3, "masked_gather: x must be (B, N, D), got ", x.dim(), " dims");
  check_float(x, "masked_gather: x");
  TORCH_CHECK(idx.dim() == 3 && idx.size(1) == x.size(0), "masked_gather: idx must be (M, B, K) with B = ",
              x.size(0), ", got ", idx.sizes());
}

inline void check_gather_backward(const at::Tensor& grad, const at::Tensor& idx, int64_t n) {
  TORCH_CHECK(grad.dim() == 3 && idx.dim() == 3, "masked_gather_backward: grad must be (M*B, K, D) and idx (M, B, K)");
  check_float(grad, "masked_gather_backward: grad");
  TORCH_CHECK(grad.size(0) == idx.size(0) * idx.size(1) && grad.size(1) == idx.size(2),
              "masked_gather_backward: grad ", grad.sizes(), " does not match idx ", idx.sizes());
  TORCH_CHECK(n >= 0, "masked_gather_backward: n must be >= 0");
}

inline void check_salt(const at::Tensor& pred, const at::Tensor& feats, const at::Tensor& idx, double beta,
                       int64_t kind) {
  TORCH_CHECK(feats.dim() == 3, "salt_loss: feats must be (B, N, D), got ", feats.dim(), " dims");
  TORCH_CHECK(idx.dim() == 3 && idx.size(1) == feats.size(0), "salt_loss: idx must be (M, B, K) with B = ",
              feats.size(0), ", got ", idx.sizes());
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == idx.size(0) * idx.size(1) && pred.size(1) == idx.size(2) &&
              pred.size(2) == feats.size(2), "salt_loss: pred must be (M*B, K, D) = (", idx.size(0) * idx.size(1),
              ", ", idx.size(2), ", ", feats.size(2), "), got ", pred.sizes());
  TORCH_CHECK(pred.numel() > 0, "salt_loss: no target tokens (the mean over zero tokens is undefined)");
  check_float(pred, "salt_loss: pred");
  TORCH_CHECK(pred.scalar_type() == feats.scalar_type(), "salt_loss: pred (", pred.scalar_type(),
              ") and feats (", feats.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(pred.device() == feats.device(), "salt_loss: pred and feats must be on one device");
  TORCH_CHECK(kind >= 0 && kind <= 2, "salt_loss: kind must be 0 (smooth_l1), 1 (l1) or 2 (l2), got ", kind);
  TORCH_CHECK(beta >= 0, "salt_loss: beta must be >= 0, got ", beta);
}

}  // namespace us_jepa_ext
