// The per-element SALT loss and its derivative, shared by the C++ CPU loop and the CUDA kernel (torch-free).
// diff = pred - LN(target). KIND 0: Smooth-L1 with beta > 0; 1: L1 (also Smooth-L1 with beta = 0, as in
// torch); 2: L2. No data-dependent branch: on random signs a branch is mispredicted half the time.
#pragma once
#include <math.h>
#ifdef __CUDACC__
#define US_JEPA_HD __host__ __device__ __forceinline__
#else
#define US_JEPA_HD inline
#endif

namespace us_jepa_ext {

inline int loss_kind(long kind, double beta) { return kind == 0 && beta == 0.0 ? 1 : static_cast<int>(kind); }

template <int KIND, typename T>
US_JEPA_HD T loss_and_grad(T diff, T beta, T inv_beta, T* grad) {
  if (KIND == 2) { *grad = T(2) * diff; return diff * diff; }
  const T ad = fabs(diff);
  if (KIND == 1) { *grad = T(diff > T(0)) - T(diff < T(0)); return ad; }  // sign, 0 at 0 like torch's L1
  // Smooth-L1 without a select: with c = clamp(diff, -beta, beta), loss = c^2 / (2 beta) + |diff| - |c| and
  // grad = c / beta (= diff / beta inside, the sign outside). `quad ? diff / beta : sign` compiled to a branch,
  // 10x slower on CPU; the two clamps below compile to maxss/minss (fmin/fmax were 4x slower). NaN stays NaN.
  const T lo = diff < -beta ? -beta : diff, c = lo > beta ? beta : lo;
  *grad = c * inv_beta;
  return T(0.5) * c * c * inv_beta + ad - fabs(c);
}

}  // namespace us_jepa_ext
