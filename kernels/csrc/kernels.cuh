// CUDA kernels of us_jepa_ext, torch-free (compiles with plain nvcc in ~1 s); us_jepa_ops.cu launches them on
// the current stream. R = M*B*K target rows of D channels, s bytes per element.
//   gather_rows:      out[r] = x[b, idx[r]]                  r = (m*B + b)*K + k     bytes 2*R*D*s
//   scatter_add_rows: dx[b, idx[r]] += grad[r]              (fp32/fp64 atomics)      bytes R*D*s + B*N*D*s (min)
//   salt_rows:        y = LN(feats[b, idx[r]]) (no affine, eps 1e-5, float stats); loss_r = sum_d l(pred[r,d] - y_d);
//                     grad[r,d] = l'(pred[r,d] - y_d) / (R*D)                       bytes 3*R*D*s
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "loss_math.h"

// The index range of CUDA inputs is not checked on the host (that costs a device->host sync per
// call; the caller validates, see common.h): each warp asserts its row's index instead, one compare
// a row. torch's CUDA_KERNEL_ASSERT (kept under NDEBUG) when its headers came first, as in
// us_jepa_ops.cu; else assert().
#ifdef CUDA_KERNEL_ASSERT
#define US_JEPA_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#else
#include <assert.h>
#define US_JEPA_ASSERT(cond) assert(cond)
#endif

namespace us_jepa_ext {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// The row a warp works on (one warp a row, in every kernel below): r = (m*B + b)*K + k, its image b
// and its token n = idx[r], asserted in range. valid is false for the warps past the last row.
struct WarpRow {
  int64_t r, b, n;
  bool valid;
};

__device__ __forceinline__ WarpRow warp_row(const int64_t* __restrict__ idx, int64_t rows,
                                            int64_t B, int64_t N, int64_t K) {
  WarpRow row;
  row.r = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  row.valid = row.r < rows;
  if (!row.valid) return row;
  row.b = (row.r / K) % B;
  row.n = idx[row.r];
  US_JEPA_ASSERT(row.n >= 0 && row.n < N);
  return row;
}

// masked_gather: one warp per output row; the row is copied as `V` words (uint4 = 16 bytes when the row size
// and both pointers allow it), so one instruction moves 512 bytes per warp. Dtype-agnostic: rows are bytes.
template <typename V>
__global__ void gather_rows(const V* __restrict__ x, V* __restrict__ out,
                            const int64_t* __restrict__ idx, int64_t rows, int64_t B, int64_t N,
                            int64_t K, int64_t sb, int64_t sn, int64_t words) {
  const WarpRow row = warp_row(idx, rows, B, N, K);
  if (!row.valid) return;
  // strides in words: an expanded x (stride 0) is read in place
  const V* src = x + row.b * sb + row.n * sn;
  V* dst = out + row.r * words;
  for (int64_t w = threadIdx.x % 32; w < words; w += 32) dst[w] = src[w];
}

// masked_gather_backward: dx[b, idx[r]] += grad[r], one warp per grad row, atomics into a zeroed buffer of
// the accumulation type (float, or double for float64): indices repeat across masks. The sum order of the
// (at most M) terms per element is not fixed, so float results may differ in the last bit between runs.
template <typename T, typename A>
__global__ void scatter_add_rows(const T* __restrict__ grad, A* __restrict__ acc, const int64_t* __restrict__ idx,
                                 int64_t rows, int64_t B, int64_t N, int64_t K, int64_t D) {
  const WarpRow row = warp_row(idx, rows, B, N, K);
  if (!row.valid) return;
  A* dst = acc + (row.b * N + row.n) * D;
  const T* src = grad + row.r * D;
  for (int64_t d = threadIdx.x % 32; d < D; d += 32) atomicAdd(dst + d, static_cast<A>(to_acc(src[d])));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// salt_loss: one warp per target row. Three passes over the teacher row (mean, centred variance, loss): the
// row is read from memory once and re-read from L1. Writes grad_pred (already divided by R*D) and the row's
// loss sum; the host sums row_loss on the device (no sync).
template <int KIND, typename T>
__global__ void salt_rows(const T* __restrict__ pred, const T* __restrict__ feats, const int64_t* __restrict__ idx,
                          T* __restrict__ grad, typename Acc<T>::type* __restrict__ row_loss, int64_t rows,
                          int64_t B, int64_t N, int64_t K, int64_t D, float beta, double eps) {
  using A = typename Acc<T>::type;
  const WarpRow row = warp_row(idx, rows, B, N, K);
  if (!row.valid) return;
  const int lane = threadIdx.x % 32;
  const T* t = feats + (row.b * N + row.n) * D;
  const T* p = pred + row.r * D;
  T* g = grad + row.r * D;
  A mean = 0, var = 0, sum = 0;
  for (int64_t d = lane; d < D; d += 32) mean += to_acc(t[d]);
  mean = warp_sum(mean) / A(D);
  for (int64_t d = lane; d < D; d += 32) { A c = to_acc(t[d]) - mean; var += c * c; }
  const A rstd = A(1) / sqrt(warp_sum(var) / A(D) + A(eps));
  const A inv = A(1) / (A(rows) * A(D)), bt = A(beta), ibt = KIND == 0 ? A(1) / bt : A(0);
  for (int64_t d = lane; d < D; d += 32) {
    A gr, diff = to_acc(p[d]) - (to_acc(t[d]) - mean) * rstd;
    sum += loss_and_grad<KIND, A>(diff, bt, ibt, &gr);
    g[d] = from_acc<T>(gr * inv);
  }
  sum = warp_sum(sum);
  if (lane == 0) row_loss[row.r] = sum;
}

}  // namespace us_jepa_ext
