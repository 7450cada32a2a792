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
  const GatherArgs a = prepare_gather(x_in, idx_in, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor& x = a.x;
  const int64_t B = a.B, N = a.N, K = a.K, R = a.R;
  const int64_t es = x.element_size(), sb = x.stride(0) * es, sn = x.stride(1) * es;  // strides in bytes
  at::Tensor out = at::empty({a.M * B, K, a.D}, x.options());
  if (R == 0 || a.D == 0) return out;
  const int64_t bytes = a.D * es;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto p = reinterpret_cast<uintptr_t>(x.data_ptr()) | reinterpret_cast<uintptr_t>(out.data_ptr()) |
                 static_cast<uintptr_t>(sb) | static_cast<uintptr_t>(sn);  // every row start must be aligned
  auto launch = [&](auto* tag, int64_t width) {
    using V = std::remove_pointer_t<decltype(tag)>;
    gather_rows<V><<<blocks_for(R), kWarps * 32, 0, stream>>>(static_cast<const V*>(x.data_ptr()),
        static_cast<V*>(out.data_ptr()), a.idx.data_ptr<int64_t>(), R, B, N, K, sb / width,
        sn / width, bytes / width);
  };
  if (bytes % 16 == 0 && p % 16 == 0) launch(static_cast<uint4*>(nullptr), 16);  // widest word that fits
  else if (bytes % 8 == 0 && p % 8 == 0) launch(static_cast<uint2*>(nullptr), 8);
  else if (bytes % 4 == 0 && p % 4 == 0) launch(static_cast<uint32_t*>(nullptr), 4);
  else launch(static_cast<uint16_t*>(nullptr), 2);  // every supported dtype is >= 2 bytes
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor masked_gather_backward_cuda(const at::Tensor& grad_in, const at::Tensor& idx_in, int64_t N) {
  const GatherBackwardArgs a = prepare_gather_backward(grad_in, idx_in, N, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor& grad = a.grad;
  const int64_t B = a.B, K = a.K, D = a.D, R = a.R;
  const bool f64 = grad.scalar_type() == at::kDouble;
  at::Tensor acc = at::zeros({B, N, D}, grad.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (R > 0 && D > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch(grad.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using A = typename Acc<T>::type;
      scatter_add_rows<T, A><<<blocks_for(R), kWarps * 32, 0, stream>>>(static_cast<const T*>(grad.data_ptr()),
          static_cast<A*>(acc.data_ptr()), a.idx.data_ptr<int64_t>(), R, B, N, K, D);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> salt_loss_cuda(const at::Tensor& pred_in, const at::Tensor& feats_in,
                                                  const at::Tensor& idx_in, double beta, int64_t kind) {
  const SaltArgs a = prepare_salt(pred_in, feats_in, idx_in, beta, kind, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor& pred = a.pred;
  const int64_t B = a.B, N = a.N, D = a.D, K = a.K, R = a.R;
  const bool f64 = pred.scalar_type() == at::kDouble;
  at::Tensor grad = at::empty_like(pred);
  at::Tensor row_loss = at::empty({R}, pred.options().dtype(f64 ? at::kDouble : at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int k = a.kind;
  dispatch(pred.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = typename Acc<T>::type;
    auto args = std::make_tuple(static_cast<const T*>(pred.data_ptr()),
        static_cast<const T*>(a.feats.data_ptr()), a.idx.data_ptr<int64_t>(),
        static_cast<T*>(grad.data_ptr()), static_cast<A*>(row_loss.data_ptr()), R, B, N, K, D,
        static_cast<float>(beta), kLayerNormEps);
    auto launch = [&](auto kernel) {
      std::apply([&](auto... v) { kernel<<<blocks_for(R), kWarps * 32, 0, stream>>>(v...); }, args);
    };
    if (k == 0) {
      launch(salt_rows<0, T>);
    } else if (k == 1) {
      launch(salt_rows<1, T>);
    } else {
      launch(salt_rows<2, T>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_loss.sum().div_(static_cast<double>(R) * static_cast<double>(D)), grad};
}

TORCH_LIBRARY_IMPL(us_jepa_ext, CUDA, m) {
  register_impls(m, &masked_gather_cuda, &masked_gather_backward_cuda, &salt_loss_cuda);
}

}  // namespace us_jepa_ext
