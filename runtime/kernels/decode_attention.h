// The decode-attention kernel as a C++ function (see decode_attention.cpp), for the ops of this
// extension that call it without the dispatcher (attend_plan.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace baton {

// Whether q `(n, H, D)` is laid out as the kernel reads it: each row's heads dense, any row
// stride (q as a view of a fused projection's rows needs no copy).
inline bool has_dense_heads(const at::Tensor& q) {
  return q.dim() == 3 && q.stride(2) == 1 && (q.size(1) <= 1 || q.stride(1) == q.size(2)) &&
         (q.size(0) <= 1 || q.stride(0) >= q.size(1) * q.size(2));
}

// Row r of q `(n, H, D)` (`has_dense_heads`) over `counts[r]` keys from element `offsets[r]` of k / v, key j of KV
// head h at `offsets[r] + j * key_stride + h * head_stride`; with new_k / new_v `(n, H_kv, D)`,
// row r's own key and value are first written to its last key position. `(n, H, D)` out.
at::Tensor decode_attention(const at::Tensor& q, at::Tensor& k, at::Tensor& v,
                            const at::Tensor& offsets, const at::Tensor& counts,
                            int64_t key_stride, int64_t head_stride, int64_t kv_heads,
                            const std::optional<at::Tensor>& new_k,
                            const std::optional<at::Tensor>& new_v);

}  // namespace baton
