// What the engine's packed GEMMs share (packed_sgemm.cpp for float32, packed_bf16.cpp for
// bfloat16): the prefetch shares of a block's tiles, the output tensor of x's rows, and
// SwiGLU's product on float32 sums.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <vector>

#include "softmax_exp.h"

namespace baton {

// How many steps (W rows or pairs) of the next K block each tile after a block's first asks
// for, when the first tile's stream already asks for the next block's first `streamed` of
// `depth` and the block is read by `tiles` tiles: equal shares, rounded up; 0 for one tile.
inline int64_t prefetch_share_steps(int64_t depth, int64_t streamed, int64_t tiles) {
  return tiles > 1 ? (depth - streamed + tiles - 2) / (tiles - 1) : 0;
}

// The output (..., features) of x's rows: zeros when K is 0 (every sum empty), else unset.
inline at::Tensor output_rows(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  return x.size(-1) == 0 ? at::zeros(shape, x.options()) : at::empty(shape, x.options());
}

#if defined(__AVX2__) && defined(__FMA__)
// silu(g) * u = g * sigmoid(g) * u, sigmoid from e^-|g| (never overflows): 1 / (1 + e) for
// g >= 0, e / (1 + e) below.
inline __m256 swiglu8(__m256 g, __m256 u) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 e = exp_nonpositive(_mm256_or_ps(g, sign));  // e^-|g|
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, g), _mm256_add_ps(one, e));
  return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), u);
}
#endif

}  // namespace baton
