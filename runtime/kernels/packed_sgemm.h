// The engine's own packed sgemm for float32 linears (see packed_sgemm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace baton {

// y = x W^T (+ bias) with W packed by `sgemm_pack`: x (..., K) float32, y (..., N).
at::Tensor sgemm_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                               int64_t out_features, const std::optional<at::Tensor>& bias);

}  // namespace baton
