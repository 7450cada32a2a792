// Input checks and setup shared by the CPU (us_jepa_ops.cpp) and CUDA (us_jepa_ops.cu)
// implementations of one schema: each op starts with prepare_*, which checks every input and
// returns the tensors in the layout the kernels read, with their sizes. Every check is a
// TORCH_CHECK, so a bad input raises a Python RuntimeError with the message, never UB, except the
// index range on CUDA (see host_checks_indices).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "loss_math.h"

namespace us_jepa_ext {

constexpr double kLayerNormEps = 1e-5;  // F.layer_norm's default: the reference in us_jepa.py uses it

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", s);
}

// Range-check idx on the host? Always for CPU tensors: there it costs one pass over the indices.
// For CUDA tensors reading min/max back is one device->host sync per call, so only under
// US_JEPA_CHECK_INDICES=1 (debugging); otherwise the caller validates (kernels.check_indices on the
// CPU indices, before the copy) and the kernels assert on the device. kernels/__init__.py
// (host_checks_indices) decides the same way.
inline bool host_checks_indices(const at::Tensor& idx) {
  if (idx.is_cpu()) return true;
  const char* flag = std::getenv("US_JEPA_CHECK_INDICES");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

// idx (M, B, K) integer, on x's device, every entry in [0, n) (see above). Returns it as contiguous
// int64.
inline at::Tensor check_index(const at::Tensor& idx, const at::Tensor& x, int64_t n,
                              const char* op) {
  TORCH_CHECK(idx.dim() == 3, op, ": idx must be (M, B, K), got ", idx.dim(), " dims");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
              op, ": idx must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == x.device(), op, ": idx is on ", idx.device(), " but the data on ",
              x.device());
  if (idx.numel() > 0 && host_checks_indices(idx)) {
    auto [lo, hi] = at::aminmax(idx);
    const int64_t l = lo.item<int64_t>();
    const int64_t h = hi.item<int64_t>();
    TORCH_CHECK(l >= 0 && h < n, op, ": index out of range: idx holds values in [", l, ", ", h,
                "] but must lie in [0, ", n, ")");
  }
  return idx.to(at::kLong).contiguous();
}

// Each implementation is registered for one device type: a tensor of another type is a dispatch
// bug.
inline void check_device(const at::Tensor& t, c10::DeviceType type, const char* op) {
  TORCH_CHECK(t.device().type() == type, op, ": the ", c10::DeviceTypeName(type), " kernel got a ",
              t.device(), " tensor");
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

// What every op starts from, checked: idx as contiguous int64 (check_index), the data on the device
// type the implementation is registered for, and the sizes: R = M*B*K rows r = (m*B + b)*K + k of D
// channels, read from images of N tokens.
struct Rows {
  at::Tensor idx;
  int64_t M, B, K, N, D, R;
};

inline Rows index_rows(const at::Tensor& data, const at::Tensor& idx_in, int64_t n,
                       c10::DeviceType type, const char* op) {
  check_device(data, type, op);
  at::Tensor idx = check_index(idx_in, data, n, op);
  const int64_t M = idx.size(0), B = idx.size(1), K = idx.size(2);
  return Rows{idx, M, B, K, n, data.size(2), M * B * K};
}

// masked_gather's x with contiguous rows: the batch and token strides are free, so an expanded x
// (stride 0 over the batch, like the predictor's positions) is read in place; other layouts cost
// one copy here.
struct GatherArgs : Rows {
  at::Tensor x;
};

inline GatherArgs prepare_gather(const at::Tensor& x, const at::Tensor& idx, c10::DeviceType type) {
  check_gather(x, idx);
  GatherArgs a{index_rows(x, idx, x.size(1), type, "masked_gather")};
  a.x = x.stride(2) == 1 || a.D <= 1 ? x : x.contiguous();
  return a;
}

// masked_gather_backward's grad (M*B, K, D), contiguous.
struct GatherBackwardArgs : Rows {
  at::Tensor grad;
};

inline GatherBackwardArgs prepare_gather_backward(const at::Tensor& grad, const at::Tensor& idx,
                                                  int64_t n, c10::DeviceType type) {
  check_gather_backward(grad, idx, n);
  GatherBackwardArgs a{index_rows(grad, idx, n, type, "masked_gather_backward")};
  a.grad = grad.contiguous();
  return a;
}

// salt_loss's pred and feats, contiguous, and the loss kind the kernels instantiate (Smooth-L1 with
// beta = 0 is L1: loss_kind).
struct SaltArgs : Rows {
  at::Tensor pred, feats;
  int kind;
};

inline SaltArgs prepare_salt(const at::Tensor& pred, const at::Tensor& feats, const at::Tensor& idx,
                             double beta, int64_t kind, c10::DeviceType type) {
  check_salt(pred, feats, idx, beta, kind);  // pred and feats share dtype and device
  SaltArgs a{index_rows(feats, idx, feats.size(1), type, "salt_loss")};
  a.pred = pred.contiguous();
  a.feats = feats.contiguous();
  a.kind = loss_kind(kind, beta);
  return a;
}

// Registers one device type's implementations under the schema defined in us_jepa_ops.cpp.
template <typename Gather, typename GatherBackward, typename Salt>
void register_impls(torch::Library& m, Gather gather, GatherBackward gather_backward, Salt salt) {
  m.impl("masked_gather", gather);
  m.impl("masked_gather_backward", gather_backward);
  m.impl("salt_loss", salt);
}

}  // namespace us_jepa_ext
