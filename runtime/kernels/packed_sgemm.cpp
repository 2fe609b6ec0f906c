// float32 linears on the engine's own packed sgemm (AVX2 + FMA), `linear_backend: native`.
//
// Why: at decode sizes (1-64 rows) the library kernels leave most of a 2-core AVX2 CPU idle.
// On a Zen 3 EPYC a SmolLM2-135M-shaped model's decoder linears ran, per pass, at 103 GFLOP/s
// on oneDNN's packed weights at 32 rows and 123 at 64, against about 150 for a large sgemm;
// this kernel ran them at 139 and 155, and 1.2-1.6x oneDNN's rate from 1 to 16 rows, level or
// better at prefill sizes (256-2048 rows); tuned since (even tiles, K blocks of 192), 157 at
// 32 rows and 169 at 64, against 187 for this tile on cache-resident data. See
// docs/benchmarks.md (twenty-fourth and twenty-fifth sessions).
//
// Layout: the weight W (N, K) is cut into panels of 16 output features; each panel is stored
// as K rows of 16 floats, contiguous (N padded to a multiple of 16 with zero features). The
// kernel walks a panel's K rows once per block of up to 6 input rows, holding a 6 x 16 tile
// of the output in 12 AVX registers: two 8-float loads of W and six broadcasts of x per 12
// FMAs. The K dimension is cut into blocks of 192, so a panel's block (12 KiB) and x's block
// at decode sizes (24 KiB at 32 rows) share L1 while every row block of x uses them (blocks
// of 256 overflowed it: 0.92x the rate at 8-32 rows); rows are cut into blocks of 192 so x's
// block stays in L2 at prefill sizes. Threads split the panels, each writing its own
// columns: each thread one contiguous range sized by its measured speed, or from
// `g_claim_rows` rows up (row block, panel group) items claimed from a shared counter
// (`for_each_block`).
//
// Exactness: each output is one float32 FMA chain per K block, in order, the blocks' sums
// added in order, so the result does not depend on the row count or the thread count (a row's
// values are the same alone or in a batch), but it differs from `F.linear`'s summation order
// by float32 rounding; like the other packed kernels it runs for float32 only (float64 keeps
// `F.linear`).
#include "packed_sgemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <vector>

#include "gemm_common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BATON_SGEMM 1
#endif

namespace {

constexpr int64_t kPanel = 16;      // output features per panel (two 8-float vectors)
constexpr int64_t kDepth = 192;     // K block: a panel's block is 12 KiB, L1-resident
constexpr int64_t kRowBlock = 192;  // x rows per block at prefill sizes (L2-resident)
// How many of a panel's K rows ahead the tile asks for (2 KiB): the first row block of each
// panel block streams W from memory. 8 rows ahead ran 32 rows at 0.96x this rate.
constexpr int64_t kPrefetchRows = 32;

bool sgemm_available() {
#ifdef BATON_SGEMM
  return true;
#else
  return false;
#endif
}

int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

// W (N, K) float32 -> (panels, K, 16) float32; W itself is not changed.
at::Tensor sgemm_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_cpu(),
              "baton_kernels::sgemm_pack: weight must be a 2-D float32 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), p = panels(n);
  at::Tensor packed = at::zeros({p, k, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, p, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t cols = std::min(kPanel, n - q * kPanel);
      for (int64_t c = 0; c < cols; ++c) {
        const float* row = src + (q * kPanel + c) * k;
        float* out = dst + q * k * kPanel + c;
        for (int64_t j = 0; j < k; ++j) out[j * kPanel] = row[j];
      }
    }
  });
  return packed;
}

// The packed weight back as W (N, K), exactly (the packing only moves values).
at::Tensor sgemm_unpack(const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel &&
              packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
              panels(out_features) == packed.size(0),
              "baton_kernels::sgemm_unpack: not a packed weight of ", out_features, " features");
  const int64_t n = out_features, k = packed.size(1);
  at::Tensor w = at::empty({n, k}, packed.options());
  const float* src = packed.data_ptr<float>();
  float* dst = w.data_ptr<float>();
  for (int64_t f = 0; f < n; ++f) {
    const float* col = src + (f / kPanel) * k * kPanel + f % kPanel;
    for (int64_t j = 0; j < k; ++j) dst[f * k + j] = col[j * kPanel];
  }
  return w;
}

// How many rows the GEMMs spread their W prefetches up to (see `prefetch_share` below).
constexpr int64_t kDefaultSpreadRows = 32;
std::atomic<int64_t> g_spread_rows{kDefaultSpreadRows};

// Sets how many rows of x the GEMMs spread their prefetches up to (0: never), for the calls
// that start after it; returns the value it replaces.
int64_t sgemm_set_spread_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "baton_kernels::sgemm_set_spread_rows: rows must be >= 0, got ", rows);
  return g_spread_rows.exchange(rows, std::memory_order_relaxed);
}

// From how many rows of x the threads claim a GEMM's work item by item instead of each
// taking an even share of the panels (0: never). Why: the two cores of a shared host slow
// down independently (one core's sgemm rate moved between 59 and 91 GFLOP/s from one
// half-second to the next while the other's held, 2-core Zen 3, forty-second session), and
// with even shares every GEMM waits for the slower core. Items are a row block's
// `kClaimPanels` panels (192 rows x 64 features: about 0.2 ms of one core at 576 inputs),
// claimed in row-block order so that both threads read the same block of x. A compiled
// engine's prefill of 32 prompts (4,227 tokens) ran 1.05-1.08x as fast claimed; the pass's
// linears 0.97-1.31x from 192 rows up (21 of 28 figures above 1.02x), but 0.91-1.07x at
// 64-128 rows (`benchmarks/sgemm_threads.py claim`).
// Below the threshold (decode sizes) each thread keeps one contiguous range of panels, which
// the spread prefetch relies on (sized by speed, below). Which thread computes an output
// never changes its bits.
constexpr int64_t kDefaultClaimRows = kRowBlock;
constexpr int64_t kClaimPanels = 4;
std::atomic<int64_t> g_claim_rows{kDefaultClaimRows};

// Sets the row count from which threads claim work (0: never); returns the value it replaces.
int64_t sgemm_set_claim_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "baton_kernels::sgemm_set_claim_rows: rows must be >= 0, got ", rows);
  return g_claim_rows.exchange(rows, std::memory_order_relaxed);
}

// Below the claiming threshold each thread still takes one contiguous range of panels, but
// sized by how fast that thread ran the GEMMs before it instead of evenly: each call times
// every thread's range and moves the shares a quarter of the way towards the speeds it saw.
// A core slowed by another tenant stays slow for a while (the half-second rates above), so
// the shares follow it (they moved between 0.85 and 1.15 of an even share within a minute),
// and the ranges stay contiguous for the spread prefetch. A compiled BATON decode step ran
// 1.01-1.08x as fast at 16 rows, 1.0-1.07x at 32 and 1.0-1.07x at 64, steps alternated
// 20-60 times (`benchmarks/sgemm_threads.py balance`). Up to `kMaxBalanced` threads; `g_balance`
// off: even shares.
constexpr int64_t kMaxBalanced = 64;
constexpr float kBalanceStep = 0.25f;
std::atomic<bool> g_balance{true};
std::array<std::atomic<float>, kMaxBalanced> g_thread_share{};  // 0: not yet measured (1)

// Turns sizing the threads' shares by their speed on or off; returns the setting it replaces.
bool sgemm_set_balance(bool on) {
  return g_balance.exchange(on, std::memory_order_relaxed);
}

// The threads' current shares (1: an even share; empty until a balanced GEMM ran).
std::vector<double> sgemm_thread_shares() {
  std::vector<double> shares;
  for (const auto& share : g_thread_share) {
    const float value = share.load(std::memory_order_relaxed);
    if (value <= 0.0f) break;
    shares.push_back(value);
  }
  return shares;
}

// `for_each_block`'s contiguous split over `threads` threads, sized by `g_thread_share`.
template <typename Body>
void balanced_split(int64_t m, int64_t p, int64_t threads, const Body& body) {
  std::array<float, kMaxBalanced> weight{};
  std::array<int64_t, kMaxBalanced + 1> bounds{};
  std::array<double, kMaxBalanced> seconds{};
  float total = 0.0f;
  for (int64_t t = 0; t < threads; ++t) {
    const float w = g_thread_share[t].load(std::memory_order_relaxed);
    weight[t] = w > 0.0f ? w : 1.0f;
    total += weight[t];
  }
  float cumulative = 0.0f;
  for (int64_t t = 0; t < threads; ++t) {  // at least one panel each, in order
    cumulative += weight[t];
    const int64_t at = static_cast<int64_t>(p * (cumulative / total) + 0.5f);
    bounds[t + 1] = std::clamp<int64_t>(at, bounds[t] + 1, p - (threads - 1 - t));
  }
  bounds[threads] = p;
  const auto start = std::chrono::steady_clock::now();  // a late start counts as slowness
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t r0 = 0; r0 < m; r0 += kRowBlock)
        body(r0, std::min(kRowBlock, m - r0), bounds[t], bounds[t + 1]);
      seconds[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
  });
  // Each thread's speed in panels a second, as a share of the mean speed.
  double mean = 0.0;
  for (int64_t t = 0; t < threads; ++t) {
    if (seconds[t] <= 0.0) return;  // too fast to time: keep the shares
    mean += (bounds[t + 1] - bounds[t]) / seconds[t] / threads;
  }
  for (int64_t t = 0; t < threads; ++t) {
    const float speed = static_cast<float>((bounds[t + 1] - bounds[t]) / seconds[t] / mean);
    g_thread_share[t].store((1.0f - kBalanceStep) * weight[t] / total * threads +
                                kBalanceStep * speed, std::memory_order_relaxed);
  }
}

// Calls `body(r0, rows, q0, q1)` for every row block of an `m`-row GEMM over `p` panels, each
// block's panels [q0, q1) once, on the threads: a contiguous range of panels each, or from
// `g_claim_rows` rows work items claimed from a shared counter.
template <typename Body>
void for_each_block(int64_t m, int64_t p, const Body& body) {
  const int64_t claim_rows = g_claim_rows.load(std::memory_order_relaxed);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), p);
  const bool shared = threads >= 2 && !at::in_parallel_region();
  if (shared && claim_rows > 0 && m >= claim_rows) {
    const int64_t groups = (p + kClaimPanels - 1) / kClaimPanels;
    const int64_t items = groups * ((m + kRowBlock - 1) / kRowBlock);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
           i = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t r0 = i / groups * kRowBlock, q0 = i % groups * kClaimPanels;
        body(r0, std::min(kRowBlock, m - r0), q0, std::min(p, q0 + kClaimPanels));
      }
    });
  } else if (shared && threads <= kMaxBalanced && g_balance.load(std::memory_order_relaxed)) {
    balanced_split(m, p, threads, body);
  } else {
    at::parallel_for(0, p, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) body(r0, std::min(kRowBlock, m - r0), p0, p1);
    });
  }
}

#ifdef BATON_SGEMM

// One output row's 16 columns: stored, or added to what an earlier K block stored.
inline void store_row(float* out, __m256 lo, __m256 hi, bool first, int64_t cols) {
  if (cols == kPanel) {
    if (!first) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(out));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(out + 8));
    }
    _mm256_storeu_ps(out, lo);
    _mm256_storeu_ps(out + 8, hi);
    return;
  }
  alignas(32) float tile[kPanel];  // the last panel of an N that is not a multiple of 16
  _mm256_store_ps(tile, lo);
  _mm256_store_ps(tile + 8, hi);
  for (int64_t j = 0; j < cols; ++j) out[j] = first ? tile[j] : out[j] + tile[j];
}

// ROWS (1-6) rows of x times one panel's K block. Named accumulators, not an array: with an
// array GCC kept the tile on the stack and stored it every iteration (half the rate).
#define BATON_ROW_FMA(r)                                                  \
  if constexpr (ROWS > r) {                                               \
    const __m256 xv = _mm256_broadcast_ss(x + r * ldx + j);               \
    acc##r##lo = _mm256_fmadd_ps(xv, w_lo, acc##r##lo);                   \
    acc##r##hi = _mm256_fmadd_ps(xv, w_hi, acc##r##hi);                   \
  }
#define BATON_ROW_STORE(r) \
  if constexpr (ROWS > r) store_row(out + r * ldo, acc##r##lo, acc##r##hi, first, cols);

// Prefetches as in the bfloat16 GEMM (kernels/packed_bf16.cpp), up to `g_spread_rows` rows
// of x: the first tile over a block streams it, asking `kPrefetchRows` ahead (`stream`); the
// later tiles find it in L1 and ask for their share of what the thread reads next (`ahead`,
// `ahead_rows`: W rows into L2). Above that every tile streams. Which is faster depends on
// the machine, so the engine measures it at startup (runtime/sgemm_prefetch.py) and sets it
// (`sgemm_set_spread_rows`); the outputs are the same bits either way. The decoder's linears
// and fused SwiGLUs of a pass, spread against streaming, interleaved in one process:
// - a 2-core Zen 4 (1 MiB L2): 1.07-1.19x as fast at 8-16 rows, 1.03-1.04x at 32, 0.87-0.95x
//   at 64-256, hence the default of 32;
// - a 2-core Zen 3 (512 KiB L2), with the share asked for behind a branch: 0.92-1.02x at 4-16
//   rows, 0.82-0.88x at 24-32: the linears gained 1.03-1.09x, the fused SwiGLU lost (0.6x).
// The branch was the cost, not the prefetches: the SwiGLU's 3-row tile holds 12 accumulators
// and 4 W vectors, and with the branch GCC kept three of them on the stack, loaded and stored
// every step. Without it (below), on that Zen 3, every shape of the pass ran 1.02-1.19x as
// fast spread at 8-32 rows, the plain linears 1.01-1.15x at 40-64 and the SwiGLU 0.94-0.98x
// there; a BATON decode step 1.03-1.07x at 8-32 rows and 1.06-1.08x at 40-48 spread up to 64
// rows (docs/benchmarks.md, fortieth session). Past its share a tile asks again for the
// share's last row: a line already on its way, one issue slot.
inline void prefetch_share(const float* ahead, int64_t j, int64_t ahead_rows) {
  const int64_t row = j < ahead_rows ? j : ahead_rows - 1;
  _mm_prefetch(reinterpret_cast<const char*>(ahead + row * kPanel), _MM_HINT_T1);
}

// `kStream` a template argument: a branch in the loop cost the 6-row tile (16 AVX2 registers,
// 14 in use) 5-12% at 48-256 rows.
template <int ROWS, bool kStream>
inline void tile(const float* x, int64_t ldx, const float* w, float* out, int64_t ldo,
                 int64_t depth, bool first, int64_t cols, const float* ahead,
                 int64_t ahead_rows) {
  __m256 acc0lo = _mm256_setzero_ps(), acc0hi = acc0lo, acc1lo = acc0lo, acc1hi = acc0lo,
         acc2lo = acc0lo, acc2hi = acc0lo, acc3lo = acc0lo, acc3hi = acc0lo, acc4lo = acc0lo,
         acc4hi = acc0lo, acc5lo = acc0lo, acc5hi = acc0lo;
  // The output rows the tile ends on (stored, or read and added to after the first K block)
  // asked for now, so they are in L1 by then: at prefill sizes the output is megabytes and
  // those reads waited on L3 at the end of every tile. A pass's linears and fused SwiGLUs at
  // 128-1,024 rows ran 1.07-1.12x as fast on a 2-core Zen 3 (level at 32-64 rows).
  for (int r = 0; r < ROWS; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(out + r * ldo), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(out + r * ldo + kPanel - 1), _MM_HINT_T0);
  }
  for (int64_t j = 0; j < depth; ++j) {
    const __m256 w_lo = _mm256_loadu_ps(w + j * kPanel);
    const __m256 w_hi = _mm256_loadu_ps(w + j * kPanel + 8);
    if constexpr (kStream)
      _mm_prefetch(reinterpret_cast<const char*>(w + (j + kPrefetchRows) * kPanel), _MM_HINT_T0);
    else
      prefetch_share(ahead, j, ahead_rows);
    BATON_ROW_FMA(0) BATON_ROW_FMA(1) BATON_ROW_FMA(2)
    BATON_ROW_FMA(3) BATON_ROW_FMA(4) BATON_ROW_FMA(5)
  }
  BATON_ROW_STORE(0) BATON_ROW_STORE(1) BATON_ROW_STORE(2)
  BATON_ROW_STORE(3) BATON_ROW_STORE(4) BATON_ROW_STORE(5)
}
#undef BATON_ROW_FMA
#undef BATON_ROW_STORE

// `rows` rows of x times one panel's K block, in as few tiles of at most 6 rows as can hold
// them, sized evenly: a tile of fewer than 4 rows has fewer than 8 independent FMA chains and
// leaves the FMA units idle on their latency, so 8 rows run as 4 + 4 rather than 6 + 2 and 32
// as 6 x 4 + 4 x 2 (0.93x the time at 32 rows).
void row_block(const float* x, int64_t ldx, const float* w, float* out, int64_t ldo,
               int64_t depth, bool first, int64_t cols, int64_t rows, int64_t spread_rows) {
  const int64_t total = (rows + 5) / 6;
  const int64_t share = baton::prefetch_share_steps(kDepth, kPrefetchRows, total);
  const float* next = w + (depth + kPrefetchRows) * kPanel;  // what follows the block
  const bool spread = rows <= spread_rows;
  for (int64_t i = 0, t = 0, tiles = total; tiles > 0; --tiles, ++t) {
    const int64_t n = (rows - i + tiles - 1) / tiles;  // 1-6
    const float* xr = x + i * ldx;
    float* o = out + i * ldo;
    const float* ahead = t > 0 ? next + (t - 1) * share * kPanel : nullptr;
    const bool stream = t == 0 || !spread;
    i += n;
    switch (n) {
#define BATON_SGEMM_TILE(R)                                             \
  case R:                                                               \
    if (stream)                                                         \
      tile<R, true>(xr, ldx, w, o, ldo, depth, first, cols, ahead, share);  \
    else                                                                \
      tile<R, false>(xr, ldx, w, o, ldo, depth, first, cols, ahead, share); \
    break;
      BATON_SGEMM_TILE(6)
      BATON_SGEMM_TILE(5)
      BATON_SGEMM_TILE(4)
      BATON_SGEMM_TILE(3)
      BATON_SGEMM_TILE(2)
      default: BATON_SGEMM_TILE(1)
#undef BATON_SGEMM_TILE
    }
  }
}

// SwiGLU's two GEMMs at once: ROWS (1-3) rows of x times one K block of a gate panel and
// of the up panel with the same 16 features (12 accumulators: 3 rows x 4 vectors, 4 W loads
// and 3 broadcasts per 12 FMAs). Each output's FMA chain and K-block sums are the ones
// `tile` makes, so gate and up are bit for bit what the plain linear gives. (Tiles of 6 rows
// over half panels, 2 W loads and 6 broadcasts, ran 32 rows 1.08x slower.)
#define BATON_GATED_FMA(r)                                                \
  if constexpr (ROWS > r) {                                               \
    const __m256 xv = _mm256_broadcast_ss(x + r * ldx + j);               \
    g##r##lo = _mm256_fmadd_ps(xv, wg_lo, g##r##lo);                      \
    g##r##hi = _mm256_fmadd_ps(xv, wg_hi, g##r##hi);                      \
    u##r##lo = _mm256_fmadd_ps(xv, wu_lo, u##r##lo);                      \
    u##r##hi = _mm256_fmadd_ps(xv, wu_hi, u##r##hi);                      \
  }
#define BATON_GATED_STORE(r)                                                           \
  if constexpr (ROWS > r) {                                                            \
    store_row(part + r * kGatedWidth, g##r##lo, g##r##hi, first, kPanel);              \
    store_row(part + r * kGatedWidth + kPanel, u##r##lo, u##r##hi, first, kPanel);     \
  }

constexpr int64_t kGatedWidth = 2 * kPanel;  // a row's gate then up partial sums

template <int ROWS, bool kStream>
inline void gated_tile(const float* x, int64_t ldx, const float* wg, const float* wu,
                       float* part, int64_t depth, bool first, const float* ahead_g,
                       const float* ahead_u, int64_t ahead_rows) {
  __m256 g0lo = _mm256_setzero_ps(), g0hi = g0lo, u0lo = g0lo, u0hi = g0lo, g1lo = g0lo,
         g1hi = g0lo, u1lo = g0lo, u1hi = g0lo, g2lo = g0lo, g2hi = g0lo, u2lo = g0lo,
         u2hi = g0lo;
  for (int64_t j = 0; j < depth; ++j) {
    const __m256 wg_lo = _mm256_loadu_ps(wg + j * kPanel);
    const __m256 wg_hi = _mm256_loadu_ps(wg + j * kPanel + 8);
    const __m256 wu_lo = _mm256_loadu_ps(wu + j * kPanel);
    const __m256 wu_hi = _mm256_loadu_ps(wu + j * kPanel + 8);
    if constexpr (kStream) {
      _mm_prefetch(reinterpret_cast<const char*>(wg + (j + kPrefetchRows) * kPanel), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wu + (j + kPrefetchRows) * kPanel), _MM_HINT_T0);
    } else {
      prefetch_share(ahead_g, j, ahead_rows);
      prefetch_share(ahead_u, j, ahead_rows);
    }
    BATON_GATED_FMA(0) BATON_GATED_FMA(1) BATON_GATED_FMA(2)
  }
  BATON_GATED_STORE(0) BATON_GATED_STORE(1) BATON_GATED_STORE(2)
}
#undef BATON_GATED_FMA
#undef BATON_GATED_STORE

// `rows` rows of x times one K block of a gate/up panel pair, in tiles of at most 3 rows
// sized evenly, into `part` (rows x kGatedWidth).
void gated_row_block(const float* x, int64_t ldx, const float* wg, const float* wu, float* part,
                     int64_t depth, bool first, int64_t rows, int64_t spread_rows) {
  const int64_t total = (rows + 2) / 3;
  const int64_t share = baton::prefetch_share_steps(kDepth, kPrefetchRows, total);
  const int64_t skip = (depth + kPrefetchRows) * kPanel;  // to what follows each block
  for (int64_t i = 0, t = 0, tiles = total; tiles > 0; --tiles, ++t) {
    const int64_t n = (rows - i + tiles - 1) / tiles;  // 1-3
    const float* xr = x + i * ldx;
    float* p = part + i * kGatedWidth;
    const int64_t at = t > 0 ? skip + (t - 1) * share * kPanel : 0;
    const bool stream = t == 0 || rows > spread_rows;
    i += n;
    switch (n) {
#define BATON_GATED_TILE(R)                                                           \
  case R:                                                                             \
    if (stream)                                                                       \
      gated_tile<R, true>(xr, ldx, wg, wu, p, depth, first, wg + at, wu + at, share);  \
    else                                                                              \
      gated_tile<R, false>(xr, ldx, wg, wu, p, depth, first, wg + at, wu + at, share); \
    break;
      BATON_GATED_TILE(3)
      BATON_GATED_TILE(2)
      default: BATON_GATED_TILE(1)
#undef BATON_GATED_TILE
    }
  }
}

#endif  // BATON_SGEMM

at::Tensor sgemm_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                        const std::optional<at::Tensor>& bias) {
  return baton::sgemm_packed_linear(x, packed, out_features, bias);
}

}  // namespace

namespace baton {

at::Tensor sgemm_packed_linear(const at::Tensor& x, const at::Tensor& packed,
                               int64_t out_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(sgemm_available(), "baton_kernels::sgemm_linear: built without AVX2 and FMA");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu() && x.dim() >= 1,
              "baton_kernels::sgemm_linear: x must be a float32 CPU tensor");
  const at::Tensor a = x.contiguous();
  const int64_t k = a.size(-1), m = a.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == k && packed.size(2) == kPanel &&
              packed.size(0) == panels(out_features) && packed.is_contiguous(),
              "baton_kernels::sgemm_linear: packed weight does not match ", k, " inputs and ",
              out_features, " outputs");
  at::Tensor out = output_rows(a, out_features);
#ifdef BATON_SGEMM
  if (m > 0 && k > 0) {
    const float* xs = a.data_ptr<float>();
    const float* ws = packed.data_ptr<float>();
    float* os = out.data_ptr<float>();
    const int64_t n = out_features;
    const int64_t spread_rows = g_spread_rows.load(std::memory_order_relaxed);
    for_each_block(m, panels(n), [&](int64_t r0, int64_t rows, int64_t p0, int64_t p1) {
      for (int64_t q = p0; q < p1; ++q) {
        const int64_t cols = std::min(kPanel, n - q * kPanel);
        for (int64_t j0 = 0; j0 < k; j0 += kDepth) {
          row_block(xs + r0 * k + j0, k, ws + (q * k + j0) * kPanel, os + r0 * n + q * kPanel,
                    n, std::min(kDepth, k - j0), j0 == 0, cols, rows, spread_rows);
        }
      }
    });
  }
#endif
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return out;
}

at::Tensor sgemm_packed_swiglu(const at::Tensor& x, const at::Tensor& packed,
                               int64_t intermediate) {
  TORCH_CHECK(sgemm_available(), "baton_kernels::sgemm_swiglu: built without AVX2 and FMA");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu() && x.dim() >= 1,
              "baton_kernels::sgemm_swiglu: x must be a float32 CPU tensor");
  const at::Tensor a = x.contiguous();
  const int64_t k = a.size(-1), m = a.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(intermediate > 0 && intermediate % kPanel == 0 && packed.dim() == 3 &&
                  packed.size(1) == k && packed.size(2) == kPanel &&
                  packed.size(0) == panels(2 * intermediate) && packed.is_contiguous(),
              "baton_kernels::sgemm_swiglu: packed weight is not a gate and up projection of ",
              k, " inputs and ", intermediate, " features each (a multiple of 16)");
  at::Tensor out = output_rows(a, intermediate);
#ifdef BATON_SGEMM
  if (m > 0 && k > 0) {
    const float* xs = a.data_ptr<float>();
    const float* ws = packed.data_ptr<float>();
    float* os = out.data_ptr<float>();
    const int64_t gate_panels = intermediate / kPanel;
    const int64_t spread_rows = g_spread_rows.load(std::memory_order_relaxed);
    for_each_block(m, gate_panels, [&](int64_t r0, int64_t rows, int64_t p0, int64_t p1) {
      thread_local std::vector<float> part(kRowBlock * kGatedWidth);  // gate/up sums
      for (int64_t q = p0; q < p1; ++q) {
        const float* wg = ws + q * k * kPanel;
        const float* wu = ws + (q + gate_panels) * k * kPanel;
        for (int64_t j0 = 0; j0 < k; j0 += kDepth) {
          gated_row_block(xs + r0 * k + j0, k, wg + j0 * kPanel, wu + j0 * kPanel,
                          part.data(), std::min(kDepth, k - j0), j0 == 0, rows,
                          spread_rows);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float* pr = part.data() + r * kGatedWidth;
          float* o = os + (r0 + r) * intermediate + q * kPanel;
          _mm256_storeu_ps(o, swiglu8(_mm256_loadu_ps(pr), _mm256_loadu_ps(pr + kPanel)));
          _mm256_storeu_ps(o + 8, swiglu8(_mm256_loadu_ps(pr + 8),
                                          _mm256_loadu_ps(pr + kPanel + 8)));
        }
      }
    });
  }
#endif
  return out;
}

}  // namespace baton

TORCH_LIBRARY_FRAGMENT(baton_kernels, m) {
  m.def("sgemm_available() -> bool", TORCH_FN(sgemm_available));
  m.def("sgemm_pack(Tensor weight) -> Tensor", TORCH_FN(sgemm_pack));
  m.def("sgemm_set_spread_rows(int rows) -> int", TORCH_FN(sgemm_set_spread_rows));
  m.def("sgemm_set_claim_rows(int rows) -> int", TORCH_FN(sgemm_set_claim_rows));
  m.def("sgemm_set_balance(bool on) -> bool", TORCH_FN(sgemm_set_balance));
  m.def("sgemm_thread_shares() -> float[]", TORCH_FN(sgemm_thread_shares));
  m.def("sgemm_unpack(Tensor packed, int out_features) -> Tensor", TORCH_FN(sgemm_unpack));
  m.def("sgemm_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  m.impl("sgemm_linear", c10::DispatchKey::CPU, TORCH_FN(sgemm_linear));
  m.def("sgemm_swiglu(Tensor x, Tensor packed, int intermediate) -> Tensor");
  m.impl("sgemm_swiglu", c10::DispatchKey::CPU, TORCH_FN(baton::sgemm_packed_swiglu));
}
