// The compiled decoder's attention op with no Python in a decode pass: `baton_kernels::attend`.
//
// The compiled decoder calls its attention through an opaque op, because the attention
// belongs to the pass's KV layout (`runtime/compiled_forward.py`). Implemented in Python
// (`baton_runtime::attend`, which runs the layout's handle), that op cost 40-60 us of
// interpreter time per layer beyond the kernel: about 1.5 ms of a 30-layer decode step on a
// 2-core AVX2 host, at every batch size. Most passes are decode-only, where a layout's whole
// attention is one decode-kernel call per layer over per-layer K/V storage with the same row
// offsets and counts in every layer. A layout hands that description (its "plan") over once
// per pass (`set_decode_plan`), and this op then calls the kernel directly. Any other pass
// (prompts, SDPA, a layout without a plan) has no plan, and the op calls the Python op back
// through the dispatcher, as before.
//
// The plan is per thread, like the Python pass state it mirrors: a background compile on
// another thread never sees the serving thread's plan. `clear_decode_plan` returns the
// seconds the kernel calls took, for layouts that time their attention (Orca's scheduler).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "decode_attention.h"

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

struct DecodePlan {
  std::vector<at::Tensor> keys, values;  // per layer: the storage the kernel reads in place
  at::Tensor offsets, counts;            // per decode row, the same in every layer
  int64_t key_stride = 0, head_stride = 0, kv_heads = 0;
  double seconds = 0.0;  // spent in the kernel since the plan was set
  bool set = false;
};

thread_local DecodePlan plan;

void set_decode_plan(std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
                     const at::Tensor& offsets, const at::Tensor& counts, int64_t key_stride,
                     int64_t head_stride, int64_t kv_heads) {
  TORCH_CHECK(!keys.empty() && keys.size() == values.size(),
              "baton_kernels::set_decode_plan: one key and one value tensor per layer");
  TORCH_CHECK(offsets.numel() == counts.numel() && offsets.numel() > 0,
              "baton_kernels::set_decode_plan: one offset and one count per decode row");
  plan = DecodePlan{std::move(keys), std::move(values), offsets, counts, key_stride,
                    head_stride, kv_heads, 0.0, true};
}

double clear_decode_plan() {
  const double seconds = plan.seconds;
  plan = DecodePlan{};
  return seconds;
}

// The Python op, for passes without a plan (it runs the layout's own handle).
at::Tensor python_attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("baton_runtime::attend", "")
          .typed<at::Tensor(int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(layer, q, k, v);
}

at::Tensor dense_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }
at::Tensor dense_heads(const at::Tensor& q) {  // q split from a fused QK: read in place
  return baton::has_dense_heads(q) ? q : q.contiguous();
}

// q `(N, H, D)`, k / v `(N, H_kv, D)` of the pass. N is the plan's rows, or more in a padded
// fixed-shape pass (`runtime/static_graphs.py`), whose pad rows get zeros and never reach the
// cache, as the Python op does it.
at::Tensor attend(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (!plan.set) return python_attend(layer, q, k, v);
  const int64_t rows = plan.offsets.numel();
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(plan.keys.size()),
              "baton_kernels::attend: layer ", layer, " is outside the decode plan");
  TORCH_CHECK(q.size(0) >= rows, "baton_kernels::attend: the pass has ", q.size(0),
              " rows, the decode plan ", rows);
  const auto started = std::chrono::steady_clock::now();
  const bool padded = q.size(0) > rows;
  const auto real = [&](const at::Tensor& t) { return padded ? t.narrow(0, 0, rows) : t; };
  at::Tensor out = baton::decode_attention(
      dense_heads(real(q)), plan.keys[layer], plan.values[layer], plan.offsets, plan.counts,
      plan.key_stride, plan.head_stride, plan.kv_heads, dense_rows(real(k)),
      dense_rows(real(v)));
  if (padded) {
    at::Tensor full = at::zeros(q.sizes(), q.options());
    full.narrow(0, 0, rows).copy_(out);
    out = full;
  }
  plan.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(baton_kernels, m) {
  m.def("set_decode_plan(Tensor[] keys, Tensor[] values, Tensor offsets, Tensor counts, "
        "int key_stride, int head_stride, int kv_heads) -> ()",
        TORCH_FN(set_decode_plan));
  m.def("clear_decode_plan() -> float", TORCH_FN(clear_decode_plan));
  m.def("attend(int layer, Tensor q, Tensor k, Tensor v) -> Tensor");
  m.impl("attend", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(attend));
}
