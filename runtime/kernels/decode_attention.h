// The decode-attention kernel as a C++ function (see decode_attention.cpp), for the ops of this
// extension that call it without the dispatcher (attend_plan.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace baton {

// Row r of q `(n, H, D)` over `counts[r]` keys from element `offsets[r]` of k / v, key j of KV
// head h at `offsets[r] + j * key_stride + h * head_stride`; with new_k / new_v `(n, H_kv, D)`,
// row r's own key and value are first written to its last key position. `(n, H, D)` out.
at::Tensor decode_attention(const at::Tensor& q, at::Tensor& k, at::Tensor& v,
                            const at::Tensor& offsets, const at::Tensor& counts,
                            int64_t key_stride, int64_t head_stride, int64_t kv_heads,
                            const std::optional<at::Tensor>& new_k,
                            const std::optional<at::Tensor>& new_v);

}  // namespace baton
