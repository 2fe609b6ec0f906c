// float32 linears on MKL's packed sgemm: `cblas_sgemm_pack` lays a weight out once in MKL's
// internal format, and `cblas_sgemm_compute` multiplies any number of rows by it.
//
// Why: at decode sizes a GEMM spends much of its time re-laying the weight out. oneDNN's
// prepacked weights (runtime/linear_kernels.py) fix that too, but on a 2-core AVX-512 Xeon
// one MKL-packed copy ran a SmolLM2-135M-shaped model's linears 1.15-1.6x faster than
// oneDNN's packed ones from 1 to 128 rows and 1.06-1.11x at 256-512 (docs/benchmarks.md).
//
// MKL is linked into the x86-64 builds of libtorch_cpu, which exports its CBLAS entry points;
// other builds (aarch64) do not. The symbols are declared weak, so this extension loads either
// way and `mkl_available()` says whether they resolved.
//
// One packed copy serves every row count: the packed size and layout do not depend on the `m`
// given to the packing calls (checked on this build), only its speed does, and packing for
// 256 rows ran fastest at every row count measured. MKL allocates for the packed matrix more
// than it writes (`pack_get_size` asks ~3x the weight for this model's shapes, ~the weight's
// size is touched); untouched pages cost no memory.
#include "mkl_linear.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstddef>
#include <vector>

extern "C" {
// MKL's LP64 CBLAS interface (MKL_INT = int), as libtorch_cpu links it.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k,
                         const float* a, int lda, const float* b, int ldb, float beta, float* c,
                         int ldc) __attribute__((weak));
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162, kPacked = 151;
constexpr int kPackRows = 256;  // the row count the packing is tuned for (see above)

bool mkl_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
         cblas_sgemm_compute != nullptr;
}

// W (N, K) float32 -> MKL's packed form of W^T as a byte tensor; W itself is not changed.
at::Tensor mkl_pack(const at::Tensor& weight) {
  TORCH_CHECK(mkl_available(), "baton_kernels::mkl_pack: this torch build has no MKL CBLAS");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_cpu(),
              "baton_kernels::mkl_pack: weight must be a 2-D float32 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int n = static_cast<int>(w.size(0)), k = static_cast<int>(w.size(1));
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, kPackRows, n, k);
  at::Tensor packed = at::empty({static_cast<int64_t>(bytes)}, w.options().dtype(at::kByte));
  cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, kPackRows, n, k, 1.0f, w.data_ptr<float>(), k,
                   reinterpret_cast<float*>(packed.data_ptr()));
  return packed;
}

at::Tensor mkl_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                      const std::optional<at::Tensor>& bias) {
  return baton::mkl_packed_linear(x, packed, out_features, bias);
}

}  // namespace

namespace baton {

at::Tensor mkl_packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(mkl_available(), "baton_kernels::mkl_linear: this torch build has no MKL CBLAS");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu() && x.dim() >= 1,
              "baton_kernels::mkl_linear: x must be a float32 CPU tensor");
  const at::Tensor a = x.contiguous();
  const int64_t k = a.size(-1), m = k ? a.numel() / k : 0;
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, a.options());
  if (m == 0) return out;
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m),
                      static_cast<int>(out_features), static_cast<int>(k), a.data_ptr<float>(),
                      static_cast<int>(k), reinterpret_cast<const float*>(packed.data_ptr()),
                      static_cast<int>(out_features), 0.0f, out.data_ptr<float>(),
                      static_cast<int>(out_features));
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return out;
}

}  // namespace baton

TORCH_LIBRARY_FRAGMENT(baton_kernels, m) {
  m.def("mkl_available() -> bool", TORCH_FN(mkl_available));
  m.def("mkl_pack(Tensor weight) -> Tensor", TORCH_FN(mkl_pack));
  m.def("mkl_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  m.impl("mkl_linear", c10::DispatchKey::CPU, TORCH_FN(mkl_linear));
}
