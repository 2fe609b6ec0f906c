// The compiled decoder's linears as one C++ op, `baton_kernels::linear(slot, x)`.
//
// Inductor cannot take oneDNN's packed weights (opaque MKLDNN tensors) as graph inputs or
// constants, so the compiled decoder calls each linear through an opaque op that names the
// linear by slot. Implemented in Python, that op cost about 50 us of interpreter time per call
// (120 calls per 30-layer pass: ~6 ms of a 55 ms one-row step on a 2-core AVX2 host). Here the
// slot's weight is looked up in a table filled from Python (`runtime/compiled_forward.py`)
// and the GEMM is called directly: `mkldnn::_linear_pointwise` on a oneDNN-packed weight, MKL's
// packed sgemm on an MKL-packed one (mkl_linear.cpp), the engine's own sgemm on one packed for
// it (packed_sgemm.cpp), `at::linear` on a dense one: the same
// kernels `Linear.forward` runs, so results are identical. `linear_swiglu(slot, x)` is an MLP's
// gate and up projection with SwiGLU's product, fused on the engine's sgemm.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include "mkl_linear.h"
#include "packed_bf16.h"
#include "packed_sgemm.h"

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace {

// How a slot's weight tensor is laid out (`Linear.packed_by` in Python).
enum Kind : int64_t { kDense = 0, kOneDnn = 1, kMkl = 2, kNative = 3 };

struct Slot {
  at::Tensor weight;  // dense (out, in), or the packed form `kind` names
  std::optional<at::Tensor> bias;
  int64_t kind = kDense;
  int64_t out_features = 0;
  bool set = false;
};

std::mutex slots_mutex;
std::vector<Slot> slots;

void set_linear(int64_t slot, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                int64_t kind, int64_t out_features) {
  TORCH_CHECK(slot >= 0, "baton_kernels::set_linear: negative slot ", slot);
  TORCH_CHECK(kind == kDense || kind == kOneDnn || kind == kMkl || kind == kNative,
              "baton_kernels::set_linear: unknown weight kind ", kind);
  std::lock_guard<std::mutex> lock(slots_mutex);
  if (static_cast<size_t>(slot) >= slots.size()) slots.resize(slot + 1);
  slots[slot] = Slot{weight, bias, kind, out_features, true};
}

Slot slot_of(int64_t slot) {
  std::lock_guard<std::mutex> lock(slots_mutex);
  TORCH_CHECK(slot >= 0 && static_cast<size_t>(slot) < slots.size() && slots[slot].set,
              "baton_kernels::linear: slot ", slot, " has no weight registered");
  return slots[slot];
}

at::Tensor packed_linear(const at::Tensor& x, const Slot& s) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(s.weight);
  stack.emplace_back(s.bias.has_value() ? c10::IValue(*s.bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

at::Tensor linear(int64_t slot, const at::Tensor& x) {
  const Slot s = slot_of(slot);
  if (s.kind == kOneDnn) return packed_linear(x, s);
  if (s.kind == kMkl) return baton::mkl_packed_linear(x, s.weight, s.out_features, s.bias);
  if (s.kind == kNative && s.weight.scalar_type() == at::kBFloat16)
    return baton::bf16_packed_linear(x, s.weight, s.out_features, s.bias);
  if (s.kind == kNative) return baton::sgemm_packed_linear(x, s.weight, s.out_features, s.bias);
  return at::linear(x, s.weight, s.bias);
}

// SwiGLU's gate: silu(first half) * second half of the slot's output. On the engine's sgemm
// or bfloat16 GEMM (no bias, halves of whole panels) one fused op; otherwise the slot's linear and
// then `at::silu` and a product, the ops the model's unfused path runs.
at::Tensor linear_swiglu(int64_t slot, const at::Tensor& x) {
  const Slot s = slot_of(slot);
  const bool biased = s.bias.has_value() && s.bias->defined();
  if (s.kind == kNative && !biased && s.weight.scalar_type() == at::kBFloat16 &&
      s.out_features % 64 == 0)
    return baton::bf16_packed_swiglu(x, s.weight, s.out_features / 2);
  if (s.kind == kNative && !biased && s.weight.scalar_type() == at::kFloat &&
      s.out_features % 32 == 0)
    return baton::sgemm_packed_swiglu(x, s.weight, s.out_features / 2);
  const std::vector<at::Tensor> halves = linear(slot, x).chunk(2, -1);
  return at::mul(at::silu(halves[0]), halves[1]);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(baton_kernels, m) {
  m.def("set_linear(int slot, Tensor weight, Tensor? bias, int kind, int out_features) -> ()",
        TORCH_FN(set_linear));
  m.def("linear(int slot, Tensor x) -> Tensor");
  m.impl("linear", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(linear));
  m.def("linear_swiglu(int slot, Tensor x) -> Tensor");
  m.impl("linear_swiglu", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(linear_swiglu));
}
