// us_jepa_ext, CUDA implementation of the schema defined in us_jepa_ops.cpp (math and bytes there).
// Light headers only (no ATen/cuda/CUDAContext.h, which pulls the cuBLAS/cuSOLVER headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "kernels.cuh"

namespace us_jepa_ext {

constexpr int kWarps = 8;  // rows per block of 256 threads (one warp per row)

static int64_t blocks_for(int64_t rows) { return (rows + kWarps - 1) / kWarps; }

// Calls f with a null pointer of the CUDA type that matches t's dtype (float, double, __half, __nv_bfloat16).
template <typename F>
static void dispatch(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "us_jepa_ext: unsupported dtype ", s);
  }
}

at::Tensor masked_gather_cuda(const at::Tensor& x_in, const at::Tensor& idx_in) {
  check_gather(x_in, idx_in);
  TORCH_CHECK(x_in.is_cuda(), "masked_gather: the CUDA kernel got a ", x_in.device(), " tensor");
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  at::Tensor idx = check_index(idx_in, x_in, N, "masked_gather");
  // Rows must be contiguous; batch and token strides are free (an expanded x is read in place, as on CPU).
  at::Tensor x = x_in.stride(2) == 1 || D <= 1 ? x_in : x_in.contiguous();
  const int64_t M = idx.size(0), K = idx.size(2), R = M * B * K;
  const int64_t es = x.element_size(), sb = x.stride(0) * es, sn = x.stride(1) * es;  // strides in bytes
  at::Tensor out = at::empty({M * B, K, D}, x.options());
  if (R == 0 || D == 0) return out;
  const int64_t bytes = D * x.element_size();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto p = reinterpret_cast<uintptr_t>(x.data_ptr()) | reinterpret_cast<uintptr_t>(out.data_ptr()) |
                 static_cast<uintptr_t>(sb) | static_cast<uintptr_t>(sn);  // every row start must be aligned
  auto launch = [&](auto* tag, int64_t width) {
    using V = std::remove_pointer_t<decltype(tag)>;
    gather_rows<V><<<blocks_for(R), kWarps * 32, 0, stream>>>(static_cast<const V*>(x.data_ptr()),
        static_cast<V*>(out.data_ptr()), idx.data_ptr<int64_t>(), R, B, K, sb / width, sn / width, bytes / width);
  };
  if (bytes % 16 == 0 && p % 16 == 0) launch(static_cast<uint4*>(nullptr), 16);  // widest word that fits
  else if (bytes % 8 == 0 && p % 8 == 0) launch(static_cast<uint2*>(nullptr), 8);
  else if (bytes % 4 == 0 && p % 4 == 0) launch(static_cast<uint32_t*>(nullptr), 4);
  else launch(static_cast<uint16_t*>(nullptr), 2);  // every supported dtype is >= 2 bytes
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor masked_gather_backward_cuda(const at::Tensor& grad_in, const at::Tensor& idx_in, int64_t N) {
  check_gather_backward(grad_in, idx_in, N);
  TORCH_CHECK(grad_in.is_cuda(), "masked_gather_backward: the CUDA kernel got a ", grad_in.device(), " tensor");
  c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor idx = check_index(idx_in, grad_in, N, "masked_gather_backward");
  at::Tensor grad = grad_in.contiguous();
  const int64_t M = idx.size(0), B = idx.size(1), K = idx.size(2), D = grad.size(2), R = M * B * K;
  const bool f64 = grad.scalar_type() == at::kDouble;
  at::Tensor acc = at::zeros({B, N, D}, grad.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (R > 0 && D > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch(grad.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using A = typename Acc<T>::type;
      scatter_add_rows<T, A><<<blocks_for(R), kWarps * 32, 0, stream>>>(static_cast<const T*>(grad.data_ptr()),
          static_cast<A*>(acc.data_ptr()), idx.data_ptr<int64_t>(), R, B, N, K, D);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> salt_loss_cuda(const at::Tensor& pred_in, const at::Tensor& feats_in,
                                                  const at::Tensor& idx_in, double beta, int64_t kind) {
  check_salt(pred_in, feats_in, idx_in, beta, kind);
  TORCH_CHECK(pred_in.is_cuda(), "salt_loss: the CUDA kernel got a ", pred_in.device(), " tensor");
  c10::cuda::CUDAGuard guard(pred_in.device());
  const int64_t B = feats_in.size(0), N = feats_in.size(1), D = feats_in.size(2);
  at::Tensor idx = check_index(idx_in, feats_in, N, "salt_loss");
  at::Tensor pred = pred_in.contiguous(), feats = feats_in.contiguous();
  const int64_t K = idx.size(2), R = idx.size(0) * B * K;
  const bool f64 = pred.scalar_type() == at::kDouble;
  at::Tensor grad = at::empty_like(pred);
  at::Tensor row_loss = at::empty({R}, pred.options().dtype(f64 ? at::kDouble : at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int k = loss_kind(kind, beta);
  dispatch(pred.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = typename Acc<T>::type;
    auto args = std::make_tuple(static_cast<const T*>(pred.data_ptr()), static_cast<const T*>(feats.data_ptr()),
        idx.data_ptr<int64_t>(), static_cast<T*>(grad.data_ptr()), static_cast<A*>(row_loss.data_ptr()), R, B, N,
        K, D, static_cast<float>(beta), kLayerNormEps);
    auto launch = [&](auto kernel) { std::apply([&](auto... a) { kernel<<<blocks_for(R), kWarps * 32, 0, stream>>>(a...); }, args); };
    if (k == 0) launch(salt_rows<0, T>); else if (k == 1) launch(salt_rows<1, T>); else launch(salt_rows<2, T>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_loss.sum().div_(static_cast<double>(R) * static_cast<double>(D)), grad};
}

}  // namespace us_jepa_ext

TORCH_LIBRARY_IMPL(us_jepa_ext, CUDA, m) {
  m.impl("masked_gather", &us_jepa_ext::masked_gather_cuda);
  m.impl("masked_gather_backward", &us_jepa_ext::masked_gather_backward_cuda);
  m.impl("salt_loss", &us_jepa_ext::salt_loss_cuda);
}
