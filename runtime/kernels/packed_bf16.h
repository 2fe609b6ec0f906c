// The engine's own packed GEMM for bfloat16 linears (see packed_bf16.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace baton {

// y = x W^T (+ bias) with W packed by `bf16_pack`: x (..., K) bfloat16, y (..., N) bfloat16.
at::Tensor bf16_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                              int64_t out_features, const std::optional<at::Tensor>& bias);

// silu(x W_gate^T) * (x W_up^T) with [W_gate; W_up] (2I, K) packed by `bf16_pack`, I a
// multiple of 32: the product of the float32 sums, rounded to bfloat16 once.
at::Tensor bf16_packed_swiglu(const at::Tensor& x, const at::Tensor& packed,
                              int64_t intermediate);

}  // namespace baton
