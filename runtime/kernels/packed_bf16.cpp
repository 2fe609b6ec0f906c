// bfloat16 linears on the engine's own packed GEMM (AVX-512 BF16), `linear_backend: native`.
//
// Why: oneDNN's bfloat16 linears are fast at prefill sizes but not at decode sizes: on a
// 2-core Zen 4 EPYC (AVX-512 BF16, no AMX) a SmolLM2-135M-shaped model's decoder linears read
// their bfloat16 weights at about 18 GB/s at one row (11.7 ms a pass), where the float32
// sgemm streams twice the bytes at 33 GB/s (12.7 ms): bfloat16 bought nothing at batch 1.
// See docs/benchmarks.md (twenty-eighth session) for the rates from 1 to 256 rows.
//
// Layout: W (N, K) is cut into panels of 32 output features; a panel holds, for each pair of
// inputs (k, k+1), the 32 features' two weights side by side: 64 bfloat16, one 512-bit
// vector, which `vdpbf16ps` multiplies by a broadcast pair of x (k, k+1) into 16 float32 sums
// per half panel. N is padded to a multiple of 32 and K to a multiple of 2 with zeros. The
// kernel walks a panel's K block once per tile of up to 8 rows of x, holding an 8 x 32 tile of
// float32 sums in 16 registers: two W loads and eight broadcasts per 16 dot products (tiles
// of 6 rows, 12 registers, ran the decoder's linears at 0.91-0.97x the speed from 8 to 64
// rows, level at 256: docs/benchmarks.md, thirty-sixth session). K is cut
// into blocks of 192 (a panel's block is 12 KiB, L1-resident) whose float32 sums add up in a
// small buffer; each output is rounded to bfloat16 once, to nearest even. Threads split the
// panels.
//
// Exactness: bfloat16 products are exact in float32; each output's sum runs over K in one
// order (pairs, then the K blocks in order), whatever the row count or thread count, so a
// row's values are the same alone or in a batch. It differs from oneDNN's and `F.linear`'s
// order by float32 rounding before the one rounding to bfloat16.
//
// An odd K is padded with a zero input, so the shape check cannot tell x of K + 1 inputs from
// x of K: the callers (`Linear`, the slot table) always pass the linear's own input.
#include "packed_bf16.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm_common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BATON_BF16_GEMM 1
#endif

namespace {

using bf16 = c10::BFloat16;

constexpr int64_t kPanel = 32;      // output features per panel (two 16-float halves)
constexpr int64_t kDepth = 192;     // K block (pairs: 96): a panel's block is 12 KiB
constexpr int64_t kRowBlock = 192;  // x rows per block at prefill sizes
constexpr int64_t kPrefetchPairs = 32;  // how far ahead the tile asks for W (4 KiB)
constexpr int64_t kTileRows = 8;  // x rows per tile: 16 accumulators of the 32 registers

bool bf16_gemm_available() {
#ifdef BATON_BF16_GEMM
  return true;
#else
  return false;
#endif
}

int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }
int64_t pairs(int64_t k) { return (k + 1) / 2; }

// W (N, K) bfloat16 -> (panels, K/2 rounded up, 32, 2) bfloat16; W itself is not changed.
at::Tensor bf16_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_cpu(),
              "baton_kernels::bf16_pack: weight must be a 2-D bfloat16 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), p = panels(n), kp = pairs(k);
  at::Tensor packed = at::zeros({p, kp, kPanel, 2}, w.options());
  const bf16* src = w.data_ptr<bf16>();
  bf16* dst = packed.data_ptr<bf16>();
  at::parallel_for(0, p, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t cols = std::min(kPanel, n - q * kPanel);
      for (int64_t c = 0; c < cols; ++c) {
        const bf16* row = src + (q * kPanel + c) * k;
        bf16* out = dst + q * kp * kPanel * 2 + c * 2;
        for (int64_t j = 0; j < k; ++j) out[(j / 2) * kPanel * 2 + j % 2] = row[j];
      }
    }
  });
  return packed;
}

// The packed weight back as W (N, K), exactly (the packing only moves values).
at::Tensor bf16_unpack(const at::Tensor& packed, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.size(3) == 2 &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  panels(out_features) == packed.size(0) &&
                  pairs(in_features) == packed.size(1),
              "baton_kernels::bf16_unpack: not a packed weight of ", out_features, " x ",
              in_features);
  const int64_t n = out_features, k = in_features, kp = packed.size(1);
  at::Tensor w = at::empty({n, k}, packed.options());
  const bf16* src = packed.data_ptr<bf16>();
  bf16* dst = w.data_ptr<bf16>();
  for (int64_t f = 0; f < n; ++f) {
    const bf16* col = src + (f / kPanel) * kp * kPanel * 2 + (f % kPanel) * 2;
    for (int64_t j = 0; j < k; ++j) dst[f * k + j] = col[(j / 2) * kPanel * 2 + j % 2];
  }
  return w;
}

#ifdef BATON_BF16_GEMM

// x's pair (k, k+1) of row r as a broadcast 32-bit lane; `last_odd` gives (x[k], 0).
inline __m512bh pair_of(const bf16* x, bool last_odd) {
  int32_t bits;
  if (last_odd) {
    uint16_t lo;
    std::memcpy(&lo, x, 2);
    bits = lo;
  } else {
    std::memcpy(&bits, x, 4);
  }
  return (__m512bh)_mm512_set1_epi32(bits);
}

// A row's 32 float32 sums: stored, or added to what an earlier K block stored.
inline void store_sums(float* part, __m512 lo, __m512 hi, bool first) {
  if (!first) {
    lo = _mm512_add_ps(lo, _mm512_loadu_ps(part));
    hi = _mm512_add_ps(hi, _mm512_loadu_ps(part + 16));
  }
  _mm512_storeu_ps(part, lo);
  _mm512_storeu_ps(part + 16, hi);
}

// ROWS (1-8) rows of x times one panel's K block (`npairs` pairs, the last one possibly
// half: `odd_tail`), into `part` (ROWS x 32 float32 sums). Named accumulators, as in the
// float32 sgemm: an array was kept on the stack.
#define BATON_BF16_DOT(r)                                                 \
  if constexpr (ROWS > r) {                                               \
    const __m512bh xv = pair_of(x + r * ldx + 2 * j, tail);               \
    acc##r##lo = _mm512_dpbf16_ps(acc##r##lo, w_lo, xv);                  \
    acc##r##hi = _mm512_dpbf16_ps(acc##r##hi, w_hi, xv);                  \
  }
#define BATON_BF16_STORE(r) \
  if constexpr (ROWS > r) store_sums(part + r * kPanel, acc##r##lo, acc##r##hi, first);

// Prefetches: the first tile over a block streams it from memory, asking for W
// `kPrefetchPairs` ahead (`stream`); the later tiles find it in L1, and each asks for its
// share of the next block's pairs instead (`ahead`, `ahead_pairs`), so the next block's
// memory traffic is spread over this block's whole compute rather than left to its own
// first tile. The decoder's linears of a pass (weights in huge pages) ran 1.04-1.05x as fast
// at 32 rows, 1.03x at 64 and level at 1-16 and 256 (same output bit for bit; two
// interleaved runs of HEAD's kernel against this one, docs/benchmarks.md). Into L2: asked
// into L1 they were no faster.
template <int ROWS>
inline void tile(const bf16* x, int64_t ldx, const bf16* w, float* part, int64_t npairs,
                 bool odd_tail, bool first, bool stream, const bf16* ahead,
                 int64_t ahead_pairs) {
  __m512 acc0lo = _mm512_setzero_ps(), acc0hi = acc0lo, acc1lo = acc0lo, acc1hi = acc0lo,
         acc2lo = acc0lo, acc2hi = acc0lo, acc3lo = acc0lo, acc3hi = acc0lo, acc4lo = acc0lo,
         acc4hi = acc0lo, acc5lo = acc0lo, acc5hi = acc0lo, acc6lo = acc0lo, acc6hi = acc0lo,
         acc7lo = acc0lo, acc7hi = acc0lo;
  for (int64_t j = 0; j < npairs; ++j) {
    const bf16* wj = w + j * kPanel * 2;
    const __m512bh w_lo = (__m512bh)_mm512_loadu_si512(wj);
    const __m512bh w_hi = (__m512bh)_mm512_loadu_si512(wj + kPanel);
    if (stream) {
      _mm_prefetch(reinterpret_cast<const char*>(wj + kPrefetchPairs * kPanel * 2), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wj + kPrefetchPairs * kPanel * 2 + kPanel),
                   _MM_HINT_T0);
    } else if (j < ahead_pairs) {
      const bf16* aj = ahead + j * kPanel * 2;
      _mm_prefetch(reinterpret_cast<const char*>(aj), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(aj + kPanel), _MM_HINT_T1);
    }
    const bool tail = odd_tail && j == npairs - 1;
    BATON_BF16_DOT(0) BATON_BF16_DOT(1) BATON_BF16_DOT(2)
    BATON_BF16_DOT(3) BATON_BF16_DOT(4) BATON_BF16_DOT(5)
    BATON_BF16_DOT(6) BATON_BF16_DOT(7)
  }
  BATON_BF16_STORE(0) BATON_BF16_STORE(1) BATON_BF16_STORE(2)
  BATON_BF16_STORE(3) BATON_BF16_STORE(4) BATON_BF16_STORE(5)
  BATON_BF16_STORE(6) BATON_BF16_STORE(7)
}
#undef BATON_BF16_DOT
#undef BATON_BF16_STORE

// `rows` rows of x times one panel's K block, in tiles of at most 8 rows sized evenly. What
// follows the block in memory (the panel's next K block, or the next panel's first) is what
// the thread reads next: the tiles after the first ask for it, in equal shares, from the
// first `kPrefetchPairs` pairs on (the first tile's stream asks for those).
void row_block(const bf16* x, int64_t ldx, const bf16* w, float* part, int64_t npairs,
               bool odd_tail, bool first, int64_t rows) {
  const int64_t total = (rows + kTileRows - 1) / kTileRows;
  const bf16* next = w + (npairs + kPrefetchPairs) * kPanel * 2;
  const int64_t share = baton::prefetch_share_steps(kDepth / 2, kPrefetchPairs, total);
  for (int64_t i = 0, t = 0, tiles = total; tiles > 0; --tiles, ++t) {
    const int64_t n = (rows - i + tiles - 1) / tiles;  // 1 to kTileRows
    const bf16* xr = x + i * ldx;
    float* p = part + i * kPanel;
    const bf16* ahead = t > 0 ? next + (t - 1) * share * kPanel * 2 : nullptr;
    i += n;
    switch (n) {
#define BATON_BF16_TILE(R)                                                                \
  case R:                                                                                 \
    tile<R>(xr, ldx, w, p, npairs, odd_tail, first, t == 0, ahead, share); \
    break;
      BATON_BF16_TILE(8)
      BATON_BF16_TILE(7)
      BATON_BF16_TILE(6)
      BATON_BF16_TILE(5)
      BATON_BF16_TILE(4)
      BATON_BF16_TILE(3)
      BATON_BF16_TILE(2)
      default: BATON_BF16_TILE(1)
#undef BATON_BF16_TILE
    }
  }
}

// `rows` rows x one panel, all of K: the sums of every K block in order, into `part`.
void panel_sums(const bf16* x, int64_t k, const bf16* panel, float* part, int64_t rows) {
  for (int64_t j0 = 0; j0 < k; j0 += kDepth) {
    const int64_t depth = std::min(kDepth, k - j0);
    row_block(x + j0, k, panel + (j0 / 2) * kPanel * 2, part, pairs(depth), depth % 2 == 1,
              j0 == 0, rows);
  }
}

// 16 float32 values rounded to bfloat16 (nearest even), `cols` of them stored.
inline void store_bf16(bf16* out, __m512 v, int64_t cols) {
  const __m256i packed = (__m256i)_mm512_cvtneps_pbh(v);
  if (cols >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
  } else if (cols > 0) {
    _mm256_mask_storeu_epi16(out, static_cast<__mmask16>((1u << cols) - 1), packed);
  }
}

#endif  // BATON_BF16_GEMM

struct Shape {
  at::Tensor a;  // x, contiguous
  int64_t m, k;
};

Shape check_input(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                  const char* op) {
  TORCH_CHECK(bf16_gemm_available(), "baton_kernels::", op, ": built without AVX-512 BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_cpu() && x.dim() >= 1,
              "baton_kernels::", op, ": x must be a bfloat16 CPU tensor");
  at::Tensor a = x.contiguous();
  const int64_t k = a.size(-1), m = a.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) == pairs(k) && packed.size(2) == kPanel &&
                  packed.size(3) == 2 && packed.size(0) == panels(out_features) &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "baton_kernels::", op, ": packed weight does not match ", k, " inputs and ",
              out_features, " outputs");
  return {a, m, k};
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
  return baton::bf16_packed_linear(x, packed, out_features, bias);
}

}  // namespace

namespace baton {

at::Tensor bf16_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                              int64_t out_features, const std::optional<at::Tensor>& bias) {
  const Shape s = check_input(x, packed, out_features, "bf16_linear");
  const bool biased = bias.has_value() && bias->defined();
  if (biased)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features,
                "baton_kernels::bf16_linear: bias must have ", out_features, " values");
  at::Tensor out = output_rows(s.a, out_features);
#ifdef BATON_BF16_GEMM
  if (s.m > 0 && s.k > 0) {
    const at::Tensor b = biased ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bp = biased ? b.data_ptr<float>() : nullptr;
    const bf16* xs = s.a.data_ptr<bf16>();
    const bf16* ws = packed.data_ptr<bf16>();
    bf16* os = out.data_ptr<bf16>();
    const int64_t n = out_features, m = s.m, k = s.k, kp = pairs(k);
    at::parallel_for(0, panels(n), 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> part(std::min(kRowBlock, m) * kPanel);
      for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, m - r0);
        for (int64_t q = p0; q < p1; ++q) {
          panel_sums(xs + r0 * k, k, ws + q * kp * kPanel * 2, part.data(), rows);
          const int64_t cols = std::min(kPanel, n - q * kPanel);
          for (int64_t r = 0; r < rows; ++r) {
            __m512 lo = _mm512_loadu_ps(part.data() + r * kPanel);
            __m512 hi = _mm512_loadu_ps(part.data() + r * kPanel + 16);
            if (bp != nullptr) {  // in float32, before the one rounding
              const __mmask16 lo_m = static_cast<__mmask16>((1u << std::min<int64_t>(cols, 16)) - 1);
              const __mmask16 hi_m =
                  static_cast<__mmask16>((1u << std::max<int64_t>(cols - 16, 0)) - 1);
              lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(lo_m, bp + q * kPanel));
              hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(hi_m, bp + q * kPanel + 16));
            }
            bf16* o = os + (r0 + r) * n + q * kPanel;
            store_bf16(o, lo, cols);
            store_bf16(o + 16, hi, cols - 16);
          }
        }
      }
    });
  }
#endif
  if (s.k == 0 && biased) out.add_(*bias);  // every sum empty: the bias alone
  return out;
}

at::Tensor bf16_packed_swiglu(const at::Tensor& x, const at::Tensor& packed,
                              int64_t intermediate) {
  const Shape s = check_input(x, packed, 2 * intermediate, "bf16_swiglu");
  TORCH_CHECK(intermediate > 0 && intermediate % kPanel == 0,
              "baton_kernels::bf16_swiglu: ", intermediate,
              " features is not a multiple of 32");
  at::Tensor out = output_rows(s.a, intermediate);
#ifdef BATON_BF16_GEMM
  if (s.m > 0 && s.k > 0) {
    const bf16* xs = s.a.data_ptr<bf16>();
    const bf16* ws = packed.data_ptr<bf16>();
    bf16* os = out.data_ptr<bf16>();
    const int64_t m = s.m, k = s.k, kp = pairs(k), gate_panels = intermediate / kPanel;
    at::parallel_for(0, gate_panels, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> gate(std::min(kRowBlock, m) * kPanel), up(gate.size());
      for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, m - r0);
        for (int64_t q = p0; q < p1; ++q) {
          panel_sums(xs + r0 * k, k, ws + q * kp * kPanel * 2, gate.data(), rows);
          panel_sums(xs + r0 * k, k, ws + (q + gate_panels) * kp * kPanel * 2, up.data(), rows);
          for (int64_t r = 0; r < rows; ++r) {
            alignas(64) float act[kPanel];  // silu(gate) * up of the float32 sums
            const float* g = gate.data() + r * kPanel;
            const float* u = up.data() + r * kPanel;
            for (int64_t c = 0; c < kPanel; c += 8)
              _mm256_store_ps(act + c, swiglu8(_mm256_loadu_ps(g + c), _mm256_loadu_ps(u + c)));
            bf16* o = os + (r0 + r) * intermediate + q * kPanel;
            store_bf16(o, _mm512_load_ps(act), kPanel);
            store_bf16(o + 16, _mm512_load_ps(act + 16), kPanel - 16);
          }
        }
      }
    });
  }
#endif
  return out;
}

}  // namespace baton

TORCH_LIBRARY_FRAGMENT(baton_kernels, m) {
  m.def("bf16_gemm_available() -> bool", TORCH_FN(bf16_gemm_available));
  m.def("bf16_pack(Tensor weight) -> Tensor", TORCH_FN(bf16_pack));
  m.def("bf16_unpack(Tensor packed, int out_features, int in_features) -> Tensor",
        TORCH_FN(bf16_unpack));
  m.def("bf16_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  m.impl("bf16_linear", c10::DispatchKey::CPU, TORCH_FN(bf16_linear));
  m.def("bf16_swiglu(Tensor x, Tensor packed, int intermediate) -> Tensor");
  m.impl("bf16_swiglu", c10::DispatchKey::CPU, TORCH_FN(baton::bf16_packed_swiglu));
}
