// The engine's own packed sgemm for float32 linears (see packed_sgemm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace baton {

// y = x W^T (+ bias) with W packed by `sgemm_pack`: x (..., K) float32, y (..., N).
at::Tensor sgemm_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                               int64_t out_features, const std::optional<at::Tensor>& bias);

// silu(x W_gate^T) * (x W_up^T) with [W_gate; W_up] (2I, K) packed by `sgemm_pack`, I a
// multiple of 16: x (..., K) float32, y (..., I). The gate and up values are the ones
// `sgemm_packed_linear` gives; only the product is fused (no (..., 2I) intermediate).
at::Tensor sgemm_packed_swiglu(const at::Tensor& x, const at::Tensor& packed,
                               int64_t intermediate);

}  // namespace baton
