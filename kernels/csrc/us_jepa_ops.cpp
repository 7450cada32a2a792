// us_jepa_ext: the schema of the two fused ops and their CPU implementation (the CUDA one is us_jepa_ops.cu).
//
// masked_gather(x (B,N,D), idx (M,B,K)) -> out (M*B,K,D),  out[m*B+b, k, :] = x[b, idx[m,b,k], :]
//   bytes: read M*B*K*D*s (the gathered rows), write the same.          (s = bytes per element)
// masked_gather_backward(grad (M*B,K,D), idx, N) -> dx (B,N,D),  dx[b, idx[m,b,k], :] += grad[m*B+b, k, :]
//   bytes: read M*B*K*D*s, write B*N*D*s (indices repeat across masks, so it is a scatter-ADD).
// salt_loss(pred (M*B,K,D), feats (B,N,D), idx, beta, kind) -> (loss, grad_pred)
//   per row r = (m,b,k): t = feats[b, idx[m,b,k]];  y = (t - mean t) / sqrt(var t + 1e-5)  (float statistics)
//   loss = sum_{r,d} l(pred[r,d] - y[d]) / (R*D);  grad_pred[r,d] = l'(pred[r,d] - y[d]) / (R*D)
//   bytes: read pred and the R gathered feats rows, write grad_pred: 3*R*D*s. The gathered and normalised
//   targets live only in registers / cache, never in memory. Forward computes the gradient too (Liger's
//   fused-loss pattern); the registered backward only scales it by the incoming scalar gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "loss_math.h"

namespace us_jepa_ext {

at::Tensor masked_gather_cpu(const at::Tensor& x_in, const at::Tensor& idx_in) {
  const GatherArgs a = prepare_gather(x_in, idx_in, c10::DeviceType::CPU);
  const int64_t B = a.B, K = a.K, R = a.R;
  const int64_t sb = a.x.stride(0), sn = a.x.stride(1), es = a.x.element_size();
  at::Tensor out = at::empty({a.M * B, K, a.D}, a.x.options());
  const int64_t row = a.D * es;  // the op moves whole rows: a byte copy, whatever the dtype
  const char* src = static_cast<const char*>(a.x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* ix = a.idx.data_ptr<int64_t>();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = (r / K) % B;  // r = (m*B + b)*K + k
      std::memcpy(dst + r * row, src + (b * sb + ix[r] * sn) * es, row);
    }
  });
  return out;
}

at::Tensor masked_gather_backward_cpu(const at::Tensor& grad_in, const at::Tensor& idx_in, int64_t N) {
  const GatherBackwardArgs a = prepare_gather_backward(grad_in, idx_in, N, c10::DeviceType::CPU);
  const at::Tensor& grad = a.grad;
  const at::Tensor& idx = a.idx;
  const int64_t M = a.M, B = a.B, K = a.K, D = a.D;
  at::Tensor out = at::empty({B, N, D}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "masked_gather_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // bf16/fp16 accumulate in float: one rounding at the end
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t* ix = idx.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {  // one thread owns all rows of an image: no races
      std::vector<acc_t> scratch(direct ? 0 : N * D);
      for (int64_t b = b0; b < b1; ++b) {
        // zero the image's slab right before accumulating into it (it stays in cache): no separate pass
        acc_t* a = direct ? reinterpret_cast<acc_t*>(o + b * N * D) : scratch.data();
        std::fill(a, a + N * D, acc_t(0));
        for (int64_t m = 0; m < M; ++m)  // masks in order: the sum is deterministic
          for (int64_t k = 0; k < K; ++k) {
            const int64_t r = (m * B + b) * K + k;
            acc_t* dst = a + ix[r] * D;
            const scalar_t* src = g + r * D;
            for (int64_t d = 0; d < D; ++d) dst[d] += static_cast<acc_t>(src[d]);
          }
        if (!direct)
          for (int64_t i = 0; i < N * D; ++i) o[b * N * D + i] = static_cast<scalar_t>(a[i]);
      }
    });
  });
  return out;
}

// One row of the fused loss: three passes over D (mean, centred variance, loss + gradient), each written with
// 8 independent accumulators so that the compiler vectorises the reductions without reassociating floats.
template <int KIND, typename scalar_t, typename acc_t>
acc_t salt_row(const scalar_t* t, const scalar_t* p, scalar_t* gp, acc_t* buf, int64_t D, acc_t beta, acc_t inv) {
  constexpr int L = 8;
  acc_t s[L] = {};
  const int64_t Dv = D / L * L;
  for (int64_t d = 0; d < Dv; d += L)
    for (int j = 0; j < L; ++j) { buf[d + j] = static_cast<acc_t>(t[d + j]); s[j] += buf[d + j]; }
  for (int64_t d = Dv; d < D; ++d) { buf[d] = static_cast<acc_t>(t[d]); s[0] += buf[d]; }
  acc_t mean = 0;
  for (int j = 0; j < L; ++j) { mean += s[j]; s[j] = 0; }
  mean /= D;
  for (int64_t d = 0; d < Dv; d += L)
    for (int j = 0; j < L; ++j) { acc_t c = buf[d + j] - mean; s[j] += c * c; }
  for (int64_t d = Dv; d < D; ++d) { acc_t c = buf[d] - mean; s[0] += c * c; }
  acc_t var = 0;
  for (int j = 0; j < L; ++j) { var += s[j]; s[j] = 0; }
  const acc_t rstd = acc_t(1) / std::sqrt(var / D + acc_t(kLayerNormEps));
  const acc_t inv_beta = KIND == 0 ? acc_t(1) / beta : acc_t(0);
  auto one = [&](int64_t d, int j) {
    acc_t g, diff = static_cast<acc_t>(p[d]) - (buf[d] - mean) * rstd;
    s[j] += loss_and_grad<KIND, acc_t>(diff, beta, inv_beta, &g);
    gp[d] = static_cast<scalar_t>(g * inv);
  };
  for (int64_t d = 0; d < Dv; d += L)
    for (int j = 0; j < L; ++j) one(d + j, j);
  for (int64_t d = Dv; d < D; ++d) one(d, 0);
  acc_t sum = 0;
  for (int j = 0; j < L; ++j) sum += s[j];
  return sum;
}

std::tuple<at::Tensor, at::Tensor> salt_loss_cpu(const at::Tensor& pred_in, const at::Tensor& feats_in,
                                                 const at::Tensor& idx_in, double beta, int64_t kind) {
  const SaltArgs a = prepare_salt(pred_in, feats_in, idx_in, beta, kind, c10::DeviceType::CPU);
  const at::Tensor& pred = a.pred;
  const int64_t B = a.B, N = a.N, D = a.D, K = a.K, R = a.R;
  at::Tensor grad = at::empty_like(pred), loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "salt_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor row_loss = at::empty({R}, pred.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* f = a.feats.data_ptr<scalar_t>();
    const int64_t* ix = a.idx.data_ptr<int64_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    acc_t* rl = row_loss.data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / acc_t(R * D), bt = static_cast<acc_t>(beta);
    const int k = a.kind;
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(D);  // the teacher row in the accumulation type, reused by the three passes
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* t = f + (((r / K) % B) * N + ix[r]) * D;  // r = (m*B + b)*K + k
        rl[r] = k == 0 ? salt_row<0>(t, p + r * D, gp + r * D, buf.data(), D, bt, inv)
              : k == 1 ? salt_row<1>(t, p + r * D, gp + r * D, buf.data(), D, bt, inv)
                       : salt_row<2>(t, p + r * D, gp + r * D, buf.data(), D, bt, inv);
      }
    });
    loss = row_loss.sum().mul_(inv);  // a 0-dim tensor in the accumulation dtype (float; double for float64)
  });
  return {loss, grad};
}

TORCH_LIBRARY(us_jepa_ext, m) {
  m.def("masked_gather(Tensor x, Tensor idx) -> Tensor");
  m.def("masked_gather_backward(Tensor grad, Tensor idx, int n) -> Tensor");
  m.def("salt_loss(Tensor pred, Tensor feats, Tensor idx, float beta, int kind) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(us_jepa_ext, CPU, m) {
  register_impls(m, &masked_gather_cpu, &masked_gather_backward_cpu, &salt_loss_cpu);
}

}  // namespace us_jepa_ext
