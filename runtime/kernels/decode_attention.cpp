// Single-query (decode) attention over keys that stay where the KV layout keeps them.
//
// Each query row r attends to `counts[r]` keys starting at element `offsets[r]` of the layer's
// K and V storage, key j of KV head h at `offsets[r] + j * key_stride + h * head_stride`. That
// addresses BATON's dense rows (a row's real keys are the last columns of its bucket window)
// and Orca's per-request slot ranges alike, without gathering, padding or a mask: only real
// keys are read. GQA: the `H / H_kv` query heads of a group share one pass over their KV head.
//
// One task per (row, KV head), claimed in turn by ATen's threads from a shared counter
// (`attend`): scores, softmax and the
// weighted values, each streaming the keys (or values) once. A task's memory traffic is spread
// over its two passes: the scores pass asks for the task's values, the values pass for the
// thread's next task's keys (`NextKeys`, AVX-512 builds). The float path uses AVX-512 or
// AVX2/FMA when the build targets it (runtime/attention_kernels.py compiles per ISA); a
// portable loop serves float64 (exact tests) and other CPUs. Why hand-written: torch's CPU flash kernel
// runs tiny per-block GEMMs for one query row and reached a third of this machine's memory
// bandwidth on decode; this loop reaches most of it (docs/benchmarks.md).
//
// Optionally (`new_k`, `new_v`) each row's decode token's key and value are first written to
// the row's last key position, inside the same task: the layout's per-layer cache write
// without a separate indexed copy per bucket.
//
// Dtypes: q, new_k/new_v and the output share the model's dtype: float32, float64, bfloat16 or
// float16. K/V are the same dtype, or 16-bit (bfloat16, float16) under a float32 or float64
// model (`kv_cache_dtype`): the new key and value are rounded to it as they are written, and
// read widened as a 16-bit model's are. Arithmetic is float32 (float64 for float64): a 16-bit model's query is
// widened once per task and its keys and values block by block (a shift for bfloat16, F16C
// for float16), and its output rounded back to nearest even, as `Tensor.to` does. On a CPU with
// AVX-512 BF16 a bfloat16 model's scores multiply bfloat16 pairs exactly and sum in float32
// (`vdpbf16ps`, no widening), which changes only the order of the float32 additions.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "decode_attention.h"
#include "softmax_exp.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BATON_AVX2 1
#if defined(__AVX512F__)
#define BATON_AVX512 1
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define BATON_AVX512_BF16 1
#endif
#endif
#endif

namespace {

// The arithmetic type for a query dtype: float64 stays float64, everything else is float32.
template <typename QT>
using acc_t = std::conditional_t<std::is_same_v<QT, double>, double, float>;

// e^x for x <= 0: float32 (scalar and AVX2) in softmax_exp.h, float64 exactly.
using baton::exp_nonpositive;
inline double exp_nonpositive(double x) { return std::exp(x); }

// --- portable loops (any dtype, any head size) ---------------------------------------------

template <typename T, typename KT>
void scores_portable(const T* q, int64_t group, int64_t dim, const KT* k, int64_t key_stride,
                     int64_t count, T scale, T* scores) {
  for (int64_t j = 0; j < count; ++j) {
    const KT* kj = k + j * key_stride;
    for (int64_t g = 0; g < group; ++g) {
      const T* qg = q + g * dim;
      T dot = 0;
      for (int64_t d = 0; d < dim; ++d) dot += qg[d] * static_cast<T>(kj[d]);
      scores[g * count + j] = dot * scale;
    }
  }
}

// Replaces scores by exp(score - max) and returns their sum.
template <typename T>
T softmax_numerators_portable(T* s, int64_t count) {
  const T top = *std::max_element(s, s + count);
  T sum = 0;
  for (int64_t j = 0; j < count; ++j) {
    s[j] = exp_nonpositive(s[j] - top);
    sum += s[j];
  }
  return sum;
}

template <typename T, typename KT>
void weighted_values_portable(const T* probs, int64_t group, int64_t count, const KT* v,
                              int64_t key_stride, int64_t dim, T* acc) {
  for (int64_t j = 0; j < count; ++j) {
    const KT* vj = v + j * key_stride;
    for (int64_t g = 0; g < group; ++g) {
      const T p = probs[g * count + j];
      T* ag = acc + g * dim;
      for (int64_t d = 0; d < dim; ++d) ag[d] += p * static_cast<T>(vj[d]);
    }
  }
}

// The keys of the task a thread runs next (none after its last), which the AVX-512 paths'
// values pass asks for into L2 key by key. Why: the scores pass reads its task's keys from
// memory and asks for the task's values meanwhile, so the values pass finds them in L2 and
// left memory idle, and a task's arithmetic and its reads took turns instead of overlapping.
// With the next keys asked for there, 30 layers' attention on a 2-core Zen 4 at 8-64 rows of
// 128-330 keys ran 1.19-1.35x as fast in bfloat16 and 1.16-1.17x in float32; 1-4 rows and rows
// of 1,000-3,000 keys level (docs/benchmarks.md, thirty-fifth session).
template <typename KT>
struct NextKeys {
  const KT* k = nullptr;
  int64_t count = 0;

  // How many of the next task's keys a block of `n` keys from `j0` asks for (its own share),
  // and where they start.
  int64_t in_block(int64_t j0, int64_t n) const {
    return k == nullptr ? 0 : std::clamp<int64_t>(count - j0, 0, n);
  }
  const KT* from(int64_t j0, int64_t key_stride) const {
    return k == nullptr ? nullptr : k + j0 * key_stride;
  }
};

// Keys per block of the AVX2 path, small enough to stay in L1 while every query head of a
// group passes over them (a widened 16-bit block is made once per block). Blocks of 8-64
// were measured within noise of each other; these were the best.
constexpr int64_t kScoreBlock = 16;
constexpr int64_t kValueBlock = 64;
constexpr int64_t kKeyBlock = std::max(kScoreBlock, kValueBlock);

#ifdef BATON_AVX2
#ifndef BATON_PREFETCH_KEYS
#define BATON_PREFETCH_KEYS 8
#endif
// How far ahead the loops that stream keys or values from memory ask for them. Decode
// attention is bound by memory: the hardware prefetcher restarts at every row's keys and
// every 4 KiB page, and the core idles on each miss. Asking 8 keys (2 KiB of a 64-wide
// float32 head) ahead ran the 30 layers' attention of 32 rows at 0.91x the time without
// (13 -> 14.4 GB/s of this host's 20; 4 and 16 keys ahead were no better: docs/benchmarks.md).
// Reading past a row's last key only prefetches (never faults), and reads the padding or the
// next head's keys at worst.
constexpr int64_t kPrefetchKeys = BATON_PREFETCH_KEYS;

// Each task (a row's KV head) starts two streams, its keys and its values, on a cold miss;
// asking for the next task's first 16 keys and values into L2 as a task begins hides that
// start. 30 layers' attention on a 2-core Zen 4: bfloat16, 8-64 rows over 200-300 keys, 1.04x
// as fast (32 keys ahead: 1.04-1.08x); 600 keys, float32 and one row (three tasks) level
// within noise (0.94-1.02x).
constexpr int64_t kNextTaskKeys = 16;

// Ask for the `dim` elements of one key (or value) to be brought into L1 (into L2: `kToL2`).
template <typename KT, bool kToL2 = false>
inline void prefetch_key(const KT* key, int64_t dim) {
  if constexpr (kPrefetchKeys > 0) {
    const char* p = reinterpret_cast<const char*>(key);
    for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(KT)); b += 64) {
      if constexpr (kToL2)
        _mm_prefetch(p + b, _MM_HINT_T1);
      else
        _mm_prefetch(p + b, _MM_HINT_T0);
    }
  }
}

// The next task's keys past this task's `count` (a longer next task), asked for at its end.
template <typename KT>
void ask_for_the_rest(const NextKeys<KT>& next, int64_t count, int64_t key_stride, int64_t dim) {
  for (int64_t j = count; j < next.count; ++j) prefetch_key<KT, true>(next.k + j * key_stride, dim);
}

// --- AVX2/FMA float loops (head size a multiple of 8) ---------------------------------------

// Eight keys' or values' elements widened to float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 is float32's upper half
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float horizontal_sum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Four consecutive keys' dot products with one query (dim a multiple of 8): each query chunk
// is loaded once for the four keys, and the four sums are reduced together by three `hadd`s
// instead of a horizontal sum per key.
inline __m128 dot4(const float* qg, const float* k, int64_t key_stride, int64_t dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  const float* k1 = k + key_stride;
  const float* k2 = k1 + key_stride;
  const float* k3 = k2 + key_stride;
  for (int64_t d = 0; d < dim; d += 8) {
    const __m256 x = _mm256_loadu_ps(qg + d);
    a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + d), a0);
    a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k1 + d), a1);
    a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k2 + d), a2);
    a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k3 + d), a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline float dot1(const float* qg, const float* k, int64_t dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= dim; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(k + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d + 8), _mm256_loadu_ps(k + d + 8), a1);
  }
  if (d < dim) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(k + d), a0);
  return horizontal_sum(_mm256_add_ps(a0, a1));
}

// The scores of `n` float32 keys (dim a multiple of 8); row g of `scores` at
// `g * score_stride`. Keys read in place from memory go key by key, every query head in turn,
// so each is streamed once (the faster order when memory is the bound). Keys already in L1
// (a widened 16-bit block) go four at a time per query head (`kFourKeys`), the faster order
// when arithmetic is the bound. Measured on an AVX2 host: docs/benchmarks.md.
//
// `values` (keys read in place only): the same positions' values, asked for into L2 as each
// key is scored, so the values pass finds them there instead of waiting on memory while the
// memory bus idles: the two streams overlap the arithmetic instead of taking turns. 32 rows
// over 140 keys (30 layers, 9/3 heads of 64) ran at 0.82-0.91x the time without on a 2-core
// Zen 3 host; longer rows, whose keys already stream near the bus's rate, 0.95-1.0x.
template <bool kFourKeys>
void scores_block_avx2(const float* q, int64_t group, int64_t dim, const float* k,
                       int64_t key_stride, int64_t n, float scale, float* scores,
                       int64_t score_stride, const float* values = nullptr) {
  if constexpr (kFourKeys) {
    const __m128 s4 = _mm_set1_ps(scale);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      float* sg = scores + g * score_stride;
      int64_t j = 0;
      for (; j + 4 <= n; j += 4)
        _mm_storeu_ps(sg + j, _mm_mul_ps(dot4(qg, k + j * key_stride, key_stride, dim), s4));
      for (; j < n; ++j) sg[j] = dot1(qg, k + j * key_stride, dim) * scale;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      prefetch_key(k + (j + kPrefetchKeys) * key_stride, dim);
      if (values != nullptr) prefetch_key<float, true>(values + j * key_stride, dim);
      for (int64_t g = 0; g < group; ++g)
        scores[g * score_stride + j] = dot1(q + g * dim, k + j * key_stride, dim) * scale;
    }
  }
}

float softmax_numerators_avx2(float* s, int64_t count) {
  __m256 top8 = _mm256_set1_ps(s[0]);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float top = *std::max_element(lanes, lanes + 8);
  for (int64_t r = j; r < count; ++r) top = std::max(top, s[r]);
  const __m256 m = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= count; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = horizontal_sum(sum8);
  for (; j < count; ++j) {
    s[j] = exp_nonpositive(s[j] - top);
    sum += s[j];
  }
  return sum;
}

// acc_g[d0, d0 + 8 NV) += sum_j p[g, j] v_j[d0, d0 + 8 NV) over a block of `n` float32
// values (small enough to stay in L1 across the group), accumulators held in registers.
template <int NV>
void weighted_values_chunk(const float* probs, int64_t prob_stride, int64_t group, int64_t n,
                           const float* v, int64_t key_stride, int64_t d0, int64_t dim,
                           float* acc) {
  for (int64_t g = 0; g < group; ++g) {
    __m256 a[NV];
    float* ag = acc + g * dim + d0;
    for (int i = 0; i < NV; ++i) a[i] = _mm256_loadu_ps(ag + 8 * i);
    const float* pg = probs + g * prob_stride;
    for (int64_t j = 0; j < n; ++j) {  // values in place were asked for by the scores pass
      const __m256 p = _mm256_broadcast_ss(pg + j);
      const float* vj = v + j * key_stride + d0;
      for (int i = 0; i < NV; ++i) a[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * i), a[i]);
    }
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(ag + 8 * i, a[i]);
  }
}

void weighted_values_block_avx2(const float* probs, int64_t prob_stride, int64_t group,
                                int64_t n, const float* v, int64_t key_stride, int64_t dim,
                                float* acc) {
  int64_t d0 = 0;
  for (; d0 + 64 <= dim; d0 += 64)
    weighted_values_chunk<8>(probs, prob_stride, group, n, v, key_stride, d0, dim, acc);
#define BATON_VALUES_REST(NV)                                                              \
  case NV:                                                                                 \
    weighted_values_chunk<NV>(probs, prob_stride, group, n, v, key_stride, d0, dim, acc); \
    break;
  switch ((dim - d0) / 8) {
    BATON_VALUES_REST(1)
    BATON_VALUES_REST(2)
    BATON_VALUES_REST(3)
    BATON_VALUES_REST(4)
    BATON_VALUES_REST(5)
    BATON_VALUES_REST(6)
    BATON_VALUES_REST(7)
    default: break;
  }
#undef BATON_VALUES_REST
}

// A block of `n` keys (or values) as float32 rows: 16-bit storage is widened once into `buf`
// (`n * dim` floats) so every query head of the group reuses it; float32 is read in place.
template <typename KT>
const float* widened(const KT* src, int64_t key_stride, int64_t n, int64_t dim, float* buf,
                     int64_t& stride) {
  if constexpr (std::is_same_v<KT, float>) {
    stride = key_stride;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) {
      prefetch_key(src + (j + kPrefetchKeys) * key_stride, dim);
      for (int64_t d = 0; d < dim; d += 8)
        _mm256_storeu_ps(buf + j * dim + d, load8(src + j * key_stride + d));
    }
    stride = dim;
    return buf;
  }
}

// attend_one's float32 path (dim a multiple of 8), block by block over the keys.
template <typename KT>
void attend_one_avx2(const float* q, const KT* k, const KT* v, int64_t group, int64_t dim,
                     int64_t key_stride, int64_t count, float scale, float* scores,
                     float* acc, float* wide) {
  int64_t stride = 0;
  for (int64_t j0 = 0; j0 < count; j0 += kScoreBlock) {
    const int64_t n = std::min(kScoreBlock, count - j0);
    const float* kb = widened(k + j0 * key_stride, key_stride, n, dim, wide, stride);
    if constexpr (std::is_same_v<KT, float>)  // in place: the values are asked for meanwhile
      scores_block_avx2<false>(q, group, dim, kb, stride, n, scale, scores + j0, count,
                               v + j0 * key_stride);
    else
      scores_block_avx2<true>(q, group, dim, kb, stride, n, scale, scores + j0, count);
  }
  for (int64_t g = 0; g < group; ++g) {
    const float norm = 1.0f / softmax_numerators_avx2(scores + g * count, count);
    for (int64_t j = 0; j < count; ++j) scores[g * count + j] *= norm;
  }
  for (int64_t j0 = 0; j0 < count; j0 += kValueBlock) {
    const int64_t n = std::min(kValueBlock, count - j0);
    const float* vb = widened(v + j0 * key_stride, key_stride, n, dim, wide, stride);
    weighted_values_block_avx2(scores + j0, count, group, n, vb, stride, dim, acc);
  }
}
#endif  // BATON_AVX2

#ifdef BATON_AVX512
// --- AVX-512 float loops (head size a multiple of 16) ---------------------------------------
// The AVX2 loops' structure at twice the width: half the load and FMA instructions per key.
// Measured against the AVX2 build on a 2-core AVX-512 Xeon (30 layers, 9/3 heads of 64):
// float32 1.23-1.27x at 32-64 rows (docs/benchmarks.md). `attend_one` takes it for float32
// keys only (see there).

// The two 8-lane halves of a 16-lane vector added together.
inline __m256 fold_halves(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return _mm256_add_ps(_mm512_castps512_ps256(v), hi);
}

// 16 keys' elements as float32: loaded, or widened from bfloat16 (a shift) or float16
// (`vcvtph2ps`) when a float32 model keeps a 16-bit cache (`kv_cache_dtype`).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 load16(const c10::BFloat16* p) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// dot4 at 16 lanes: four consecutive keys' dot products with one float32 query (dim % 16 == 0).
template <typename KT>
inline __m128 dot4_512(const float* qg, const KT* k, int64_t key_stride, int64_t dim) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  const KT* k1 = k + key_stride;
  const KT* k2 = k1 + key_stride;
  const KT* k3 = k2 + key_stride;
  for (int64_t d = 0; d < dim; d += 16) {
    const __m512 x = _mm512_loadu_ps(qg + d);
    a0 = _mm512_fmadd_ps(x, load16(k + d), a0);
    a1 = _mm512_fmadd_ps(x, load16(k1 + d), a1);
    a2 = _mm512_fmadd_ps(x, load16(k2 + d), a2);
    a3 = _mm512_fmadd_ps(x, load16(k3 + d), a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold_halves(a0), fold_halves(a1)),
                                  _mm256_hadd_ps(fold_halves(a2), fold_halves(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <typename KT>
inline float dot1_512(const float* qg, const KT* k, int64_t dim) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= dim; d += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + d), load16(k + d), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + d + 16), load16(k + d + 16), a1);
  }
  if (d < dim) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + d), load16(k + d), a0);
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

#ifdef BATON_AVX512_BF16
// The AVX-512 BF16 dot products (defined below), for `scores_block_avx512<c10::BFloat16>`.
inline __m128 dot4_512(const c10::BFloat16* qg, const c10::BFloat16* k, int64_t key_stride,
                       int64_t dim);
inline float dot1_512(const c10::BFloat16* qg, const c10::BFloat16* k, int64_t dim);
#endif

// The scores of `n` keys (float32, dim a multiple of 16; or bfloat16 with a bfloat16 query,
// dim a multiple of 32, or with a float32 query, a multiple of 16), four keys at a time per query head (`scores_block_avx2`'s
// `kFourKeys` order). At this width that order also won for keys read in place from memory:
// 1.2x the key-by-key order at 32-64 rows on an AVX-512 Xeon. The same positions' `values`
// are asked for into L2 as the first head scores them, as the AVX2 loop does, so that the
// values pass does not wait on memory (`values` null: not asked for), and the values pass asks
// for the next task's keys in turn (`NextKeys`). 30 layers' attention on a 2-core Zen 4:
// float32 rows of 200-600 keys took 0.88-0.92x the time (1,000 keys: 1.0x), bfloat16 rows of
// 200-300 keys 0.92-0.97x; bfloat16 rows of 400-1,000 keys were 1.05-1.12x slower with the
// values asked for until the values pass asked for the next keys (now 0.95-0.97x the time).
template <typename QT, typename KT>
void scores_block_avx512(const QT* q, int64_t group, int64_t dim, const KT* k,
                         int64_t key_stride, int64_t n, float scale, float* scores,
                         int64_t score_stride, const KT* values) {
  const __m128 s4 = _mm_set1_ps(scale);
  for (int64_t g = 0; g < group; ++g) {
    const QT* qg = q + g * dim;
    float* sg = scores + g * score_stride;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      if (g == 0)  // the first head streams the keys from memory; the others find them in L1
        for (int64_t i = 0; i < 4; ++i) {
          prefetch_key(k + (j + i + kPrefetchKeys) * key_stride, dim);
          if (values != nullptr) prefetch_key<KT, true>(values + (j + i) * key_stride, dim);
        }
      _mm_storeu_ps(sg + j, _mm_mul_ps(dot4_512(qg, k + j * key_stride, key_stride, dim), s4));
    }
    for (; j < n; ++j) sg[j] = dot1_512(qg, k + j * key_stride, dim) * scale;
  }
}

// weighted_values_chunk at 16 lanes: acc_g[d0, d0 + 16 NV) over a block of `n` values. Two
// keys per step into two accumulator sets, so a 64-wide head (NV = 4) still has eight
// independent FMA chains in flight.
template <int NV>
void weighted_values_chunk_512(const float* probs, int64_t prob_stride, int64_t group,
                               int64_t n, const float* v, int64_t key_stride, int64_t d0,
                               int64_t dim, float* acc, const float* ahead, int64_t ahead_n) {
  for (int64_t g = 0; g < group; ++g) {
    __m512 a[NV], b[NV];
    float* ag = acc + g * dim + d0;
    for (int i = 0; i < NV; ++i) a[i] = _mm512_loadu_ps(ag + 16 * i), b[i] = _mm512_setzero_ps();
    const float* pg = probs + g * prob_stride;
    int64_t j = 0;
    const bool from_memory = g == 0 && d0 == 0;  // later passes find the block in L1
    for (; j + 2 <= n; j += 2) {
      const __m512 p0 = _mm512_set1_ps(pg[j]), p1 = _mm512_set1_ps(pg[j + 1]);
      const float* v0 = v + j * key_stride + d0;
      const float* v1 = v0 + key_stride;
      if (from_memory) {
        prefetch_key(v0 + kPrefetchKeys * key_stride, dim);
        prefetch_key(v1 + kPrefetchKeys * key_stride, dim);
        if (j < ahead_n) prefetch_key<float, true>(ahead + j * key_stride, dim);
        if (j + 1 < ahead_n) prefetch_key<float, true>(ahead + (j + 1) * key_stride, dim);
      }
      for (int i = 0; i < NV; ++i) {
        a[i] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * i), a[i]);
        b[i] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * i), b[i]);
      }
    }
    if (j < n) {
      const __m512 p0 = _mm512_set1_ps(pg[j]);
      const float* v0 = v + j * key_stride + d0;
      for (int i = 0; i < NV; ++i) a[i] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * i), a[i]);
    }
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(ag + 16 * i, _mm512_add_ps(a[i], b[i]));
  }
}

void weighted_values_block_avx512(const float* probs, int64_t prob_stride, int64_t group,
                                  int64_t n, const float* v, int64_t key_stride, int64_t dim,
                                  float* acc, const float* ahead = nullptr,
                                  int64_t ahead_n = 0) {  // `ahead_n` keys at `ahead` into L2
  int64_t d0 = 0;
  for (; d0 + 64 <= dim; d0 += 64, ahead_n = 0)  // the first chunk asks for them
    weighted_values_chunk_512<4>(probs, prob_stride, group, n, v, key_stride, d0, dim, acc,
                                 ahead, ahead_n);
  switch ((dim - d0) / 16) {
    case 1:
      weighted_values_chunk_512<1>(probs, prob_stride, group, n, v, key_stride, d0, dim, acc,
                                   ahead, ahead_n);
      break;
    case 2:
      weighted_values_chunk_512<2>(probs, prob_stride, group, n, v, key_stride, d0, dim, acc,
                                   ahead, ahead_n);
      break;
    case 3:
      weighted_values_chunk_512<3>(probs, prob_stride, group, n, v, key_stride, d0, dim, acc,
                                   ahead, ahead_n);
      break;
    default:
      break;
  }
}

// The group's attention probabilities over `count` keys (row g at scores + g * count).
template <typename QT, typename KT>
void probabilities_avx512(const QT* q, int64_t group, int64_t dim, const KT* k,
                          const KT* values, int64_t key_stride, int64_t count, float scale,
                          float* scores) {
  for (int64_t j0 = 0; j0 < count; j0 += kScoreBlock) {
    const int64_t n = std::min(kScoreBlock, count - j0);
    scores_block_avx512(q, group, dim, k + j0 * key_stride, key_stride, n, scale, scores + j0,
                        count, values == nullptr ? nullptr : values + j0 * key_stride);
  }
  for (int64_t g = 0; g < group; ++g) {
    const float norm = 1.0f / softmax_numerators_avx2(scores + g * count, count);
    for (int64_t j = 0; j < count; ++j) scores[g * count + j] *= norm;
  }
}

// attend_one_avx2 at 16 lanes, for float32 keys and values read in place (dim % 16 == 0).
void attend_one_avx512(const float* q, const float* k, const float* v, int64_t group,
                       int64_t dim, int64_t key_stride, int64_t count, float scale,
                       float* scores, float* acc, const NextKeys<float>& next) {
  probabilities_avx512(q, group, dim, k, v, key_stride, count, scale, scores);
  for (int64_t j0 = 0; j0 < count; j0 += kValueBlock) {
    const int64_t n = std::min(kValueBlock, count - j0);
    weighted_values_block_avx512(scores + j0, count, group, n, v + j0 * key_stride, key_stride,
                                 dim, acc, next.from(j0, key_stride), next.in_block(j0, n));
  }
  ask_for_the_rest(next, count, key_stride, dim);
}

// `n` 16-bit values widened to float32 rows of `dim` (a multiple of 16) in `buf`.
template <typename KT>
inline void widen_16_512(const KT* src, int64_t key_stride, int64_t n, int64_t dim,
                           float* buf) {
  for (int64_t j = 0; j < n; ++j) {
    prefetch_key(src + (j + kPrefetchKeys) * key_stride, dim);
    for (int64_t d = 0; d < dim; d += 16)
      _mm512_storeu_ps(buf + j * dim + d, load16(src + j * key_stride + d));
  }
}

// acc_g[d0, d0 + 64) += sum_j p[g, j] v_j[d0, d0 + 64) for G query heads over `n` 16-bit
// values: each value is widened once, in registers, and serves the G heads (4 G + 4 of the 32
// vector registers), instead of being widened into a buffer and read back once per head.
// The first head set's pass asks for `ahead_n` keys at `ahead` (the next task's) into L2.
template <int G, typename KT>
void weighted_values_16(const float* probs, int64_t prob_stride, int64_t n, const KT* v, int64_t key_stride, int64_t d0, int64_t dim,
                          float* acc, const KT* ahead, int64_t ahead_n) {
  __m512 a[G][4];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 4; ++i) a[g][i] = _mm512_loadu_ps(acc + g * dim + d0 + 16 * i);
  for (int64_t j = 0; j < n; ++j) {
    const KT* vj = v + j * key_stride + d0;
    if (d0 == 0) prefetch_key(vj + kPrefetchKeys * key_stride, dim);
    if (j < ahead_n) prefetch_key<KT, true>(ahead + j * key_stride, dim);
    __m512 w[4];
    for (int i = 0; i < 4; ++i) w[i] = load16(vj + 16 * i);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(probs[g * prob_stride + j]);
      for (int i = 0; i < 4; ++i) a[g][i] = _mm512_fmadd_ps(p, w[i], a[g][i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc + g * dim + d0 + 16 * i, a[g][i]);
}

// attend_one for 16-bit keys and values (KT) under a float32 query (a `kv_cache_dtype`
// cache; dim % 16 == 0) or, on AVX-512 BF16 builds, bfloat16 ones under a bfloat16 query
// (dim % 32 == 0). `wide` holds kKeyBlock widened values (heads of a width that is not a
// multiple of 64).
template <typename QT, typename KT>
void attend_one_16(const QT* q, const KT* k, const KT* v, int64_t group, int64_t dim,
                   int64_t key_stride, int64_t count, float scale, float* scores, float* acc,
                   float* wide, const NextKeys<KT>& next) {
  std::fill(acc, acc + group * dim, 0.0f);
  probabilities_avx512(q, group, dim, k, v, key_stride, count, scale, scores);
  for (int64_t j0 = 0; j0 < count; j0 += kValueBlock) {
    const int64_t n = std::min(kValueBlock, count - j0);
    const KT* vb = v + j0 * key_stride;
    if (dim % 64 != 0) {
      widen_16_512(vb, key_stride, n, dim, wide);
      weighted_values_block_avx512(scores + j0, count, group, n, wide, dim, dim, acc);
      continue;
    }
    for (int64_t d0 = 0; d0 < dim; d0 += 64)
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const float* pg = scores + g0 * count + j0;
        float* ag = acc + g0 * dim;
        const KT* ahead = next.from(j0, key_stride);
        const int64_t ahead_n = d0 == 0 && g0 == 0 ? next.in_block(j0, n) : 0;
        switch (std::min<int64_t>(4, group - g0)) {
          case 1: weighted_values_16<1>(pg, count, n, vb, key_stride, d0, dim, ag, ahead, ahead_n); break;
          case 2: weighted_values_16<2>(pg, count, n, vb, key_stride, d0, dim, ag, ahead, ahead_n); break;
          case 3: weighted_values_16<3>(pg, count, n, vb, key_stride, d0, dim, ag, ahead, ahead_n); break;
          default: weighted_values_16<4>(pg, count, n, vb, key_stride, d0, dim, ag, ahead, ahead_n); break;
        }
      }
  }
  ask_for_the_rest(next, count, key_stride, dim);
}
#ifdef BATON_AVX512_BF16
// --- AVX-512 BF16 (bfloat16 keys and query, head size a multiple of 32) --------------------
// A bfloat16 model's attention was bound by widening its keys (as fast as float32 keys of
// twice the bytes). `vdpbf16ps` multiplies bfloat16 pairs straight from memory: the products
// are exact in float32 and summed in float32, so the scores differ from the widening path's
// only by the order of float32 additions. Values are still widened to float32 (in registers,
// once per value for up to four query heads), so the probabilities stay float32.

// The dot products of one bfloat16 query head with four consecutive bfloat16 keys.
inline __m128 dot4_512(const c10::BFloat16* qg, const c10::BFloat16* k, int64_t key_stride,
                       int64_t dim) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  const c10::BFloat16* k1 = k + key_stride;
  const c10::BFloat16* k2 = k1 + key_stride;
  const c10::BFloat16* k3 = k2 + key_stride;
  for (int64_t d = 0; d < dim; d += 32) {
    const __m512bh x = (__m512bh)_mm512_loadu_si512(qg + d);
    a0 = _mm512_dpbf16_ps(a0, x, (__m512bh)_mm512_loadu_si512(k + d));
    a1 = _mm512_dpbf16_ps(a1, x, (__m512bh)_mm512_loadu_si512(k1 + d));
    a2 = _mm512_dpbf16_ps(a2, x, (__m512bh)_mm512_loadu_si512(k2 + d));
    a3 = _mm512_dpbf16_ps(a3, x, (__m512bh)_mm512_loadu_si512(k3 + d));
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold_halves(a0), fold_halves(a1)),
                                  _mm256_hadd_ps(fold_halves(a2), fold_halves(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline float dot1_512(const c10::BFloat16* qg, const c10::BFloat16* k, int64_t dim) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 32)
    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qg + d),
                         (__m512bh)_mm512_loadu_si512(k + d));
  return _mm512_reduce_add_ps(a);
}

#endif  // BATON_AVX512_BF16
#endif  // BATON_AVX512

// One (row, KV head): acc_g = softmax(scale q_g K^T) V for the group's query heads, in the
// arithmetic type T over keys and values stored as KT.
// `wide` is scratch for kKeyBlock * dim floats (the AVX2 path's widened blocks).
template <typename T, typename KT>
void attend_one(const T* q, const KT* k, const KT* v, int64_t group, int64_t dim,
                int64_t key_stride, int64_t count, T scale, T* scores, T* acc, float* wide,
                const NextKeys<KT>& next) {
  std::fill(acc, acc + group * dim, T(0));
#ifdef BATON_AVX2
  if constexpr (std::is_same_v<T, float>) {
#ifdef BATON_AVX512
    // float32 keys only: for 16-bit keys a 16-lane widening path was 1.1-1.16x faster alone,
    // but a bfloat16 server was 0.91x as fast with it (two interleaved runs,
    // docs/benchmarks.md). `attend` takes `attend_one_16` for a bfloat16 model where AVX-512
    // BF16 exists, and for a 16-bit cache under a float32 model (`kv_cache_dtype`).
    if constexpr (std::is_same_v<KT, float>) {
      if (dim % 16 == 0) {
        attend_one_avx512(q, k, v, group, dim, key_stride, count, scale, scores, acc, next);
        return;
      }
    }
#endif
    if (dim % 8 == 0) {
      attend_one_avx2(q, k, v, group, dim, key_stride, count, scale, scores, acc, wide);
      return;
    }
  }
#else
  (void)wide;
#endif
  (void)next;
  scores_portable(q, group, dim, k, key_stride, count, scale, scores);
  for (int64_t g = 0; g < group; ++g) {
    const T norm = T(1) / softmax_numerators_portable(scores + g * count, count);
    for (int64_t j = 0; j < count; ++j) scores[g * count + j] *= norm;
  }
  weighted_values_portable(scores, group, count, v, key_stride, dim, acc);
}

// The decode token's own key and value, `(n, H_kv, D)` with any row/head strides, written to
// each row's last key position before the row attends: the layout's per-layer cache write
// done inside the same task instead of as separate indexed copies.
template <typename QT>
struct Appended {
  const QT* k = nullptr;
  const QT* v = nullptr;
  int64_t k_row = 0, k_head = 0, v_row = 0, v_head = 0;
};

// Row r's new key or value (model dtype QT) into the cache (KT: rounded when 16-bit).
template <typename QT, typename KT>
inline void store_key(const QT* src, int64_t dim, KT* dst) {
  for (int64_t i = 0; i < dim; ++i) dst[i] = static_cast<KT>(src[i]);
}

template <typename QT, typename KT>
void attend(const at::Tensor& q, at::Tensor& k, at::Tensor& v, const int64_t* offsets,
            const int64_t* counts, int64_t key_stride, int64_t head_stride, int64_t kv_heads,
            const Appended<QT>& appended, at::Tensor& out) {
  using T = acc_t<QT>;
  constexpr bool kWideQuery = !std::is_same_v<QT, T>;  // a 16-bit model attends in float32
  constexpr bool kWideKeys = !std::is_same_v<KT, T>;   // 16-bit keys are widened to float32
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), q_row = q.stride(0);
  const int64_t group = heads / kv_heads;
  const int64_t widest = n ? *std::max_element(counts, counts + n) : 0;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dim)));
  const QT* qp = q.data_ptr<QT>();
  KT* kp = k.data_ptr<KT>();
  KT* vp = v.data_ptr<KT>();
  QT* op = out.data_ptr<QT>();
  // Threads claim tasks from a counter rather than splitting the task count evenly: rows
  // differ in length, and the schedulers order them by it (BATON's buckets longest first,
  // Orca's groups shortest first), so an even split gave one of two threads 1.26x (BATON) to
  // 1.42x (Orca) the mean of a served batch's keys, and the call waited on it. Claiming also
  // evens out a core that runs slower. Each thread claims its next task as it starts one, so
  // that it can ask for that task's first keys early; a task computes the same bits whichever
  // thread runs it, so the order changes no output.
  const int64_t tasks = n * kv_heads;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<T> scores(group * widest), acc(group * dim), wide_q(kWideQuery ? group * dim : 0);
    std::vector<float> wide(kWideKeys ? kKeyBlock * dim : 0);  // widened key/value blocks
    for (int64_t task = next_task.fetch_add(1), following = 0; task < tasks; task = following) {
      following = next_task.fetch_add(1);
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t first = offsets[r] + h * head_stride;
      NextKeys<KT> next;  // the thread's next task, asked for while this one runs
      if (following < tasks) {
        const int64_t r1 = following / kv_heads;
        const int64_t first1 = offsets[r1] + (following % kv_heads) * head_stride;
        next = {kp + first1, counts[r1]};
#ifdef BATON_AVX2  // its first keys and values now; the AVX-512 values pass asks for the rest
        for (int64_t j = 0, n1 = std::min(kNextTaskKeys, counts[r1]); j < n1; ++j) {
          prefetch_key<KT, true>(kp + first1 + j * key_stride, dim);
          prefetch_key<KT, true>(vp + first1 + j * key_stride, dim);
        }
#endif
      }
      if (appended.k != nullptr) {  // only this task touches row r's head h
        const int64_t last = first + (counts[r] - 1) * key_stride;
        store_key(appended.k + r * appended.k_row + h * appended.k_head, dim, kp + last);
        store_key(appended.v + r * appended.v_row + h * appended.v_head, dim, vp + last);
      }
      const int64_t at = (r * heads + h * group) * dim;  // in the (contiguous) output
      const int64_t q_at = r * q_row + h * group * dim;
#ifdef BATON_AVX512
      constexpr bool kHalfUnderFloat = std::is_same_v<QT, float> && kWideKeys;
#ifdef BATON_AVX512_BF16
      constexpr bool kBf16Model =
          std::is_same_v<QT, c10::BFloat16> && std::is_same_v<KT, c10::BFloat16>;
#else
      constexpr bool kBf16Model = false;
#endif
      if constexpr (kHalfUnderFloat || kBf16Model) {
        if (dim % (kBf16Model ? 32 : 16) == 0) {
          attend_one_16(qp + q_at, kp + first, vp + first, group, dim, key_stride, counts[r],
                        scale, scores.data(), acc.data(), wide.data(), next);
          for (int64_t i = 0; i < group * dim; ++i) op[at + i] = static_cast<QT>(acc[i]);
          continue;
        }
      }
#endif
      const T* qt;
      if constexpr (kWideQuery) {
        for (int64_t i = 0; i < group * dim; ++i) wide_q[i] = static_cast<T>(qp[q_at + i]);
        qt = wide_q.data();
      } else {
        qt = qp + q_at;
      }
      attend_one<T, KT>(qt, kp + first, vp + first, group, dim, key_stride, counts[r], scale,
                        scores.data(), acc.data(), wide.data(), next);
      for (int64_t i = 0; i < group * dim; ++i) op[at + i] = static_cast<QT>(acc[i]);
    }
  });
}

template <typename QT>
Appended<QT> appended_of(const std::optional<at::Tensor>& new_k,
                         const std::optional<at::Tensor>& new_v) {
  Appended<QT> a;
  if (new_k.has_value()) {
    a.k = new_k->data_ptr<QT>();
    a.v = new_v->data_ptr<QT>();
    a.k_row = new_k->stride(0), a.k_head = new_k->stride(1);
    a.v_row = new_v->stride(0), a.v_head = new_v->stride(1);
  }
  return a;
}

void check_appended(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    int64_t kv_heads,
                    const std::optional<at::Tensor>& new_k,
                    const std::optional<at::Tensor>& new_v) {
  TORCH_CHECK(new_k.has_value() == new_v.has_value(),
              "decode_attention: new_k and new_v go together");
  if (!new_k.has_value()) return;
  for (const at::Tensor* t : {&*new_k, &*new_v}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == q.size(0) && t->size(1) == kv_heads &&
                    t->size(2) == q.size(2) && t->stride(2) == 1,
                "decode_attention: new_k/new_v must be (n, kv_heads, D) with unit last stride");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(),
                "decode_attention: new_k/new_v must share q's dtype");
    const auto* p = static_cast<const char*>(t->data_ptr());
    for (const at::Tensor* cache : {&k, &v}) {
      const auto* lo = static_cast<const char*>(cache->data_ptr());
      const auto* hi = lo + cache->numel() * cache->element_size();
      TORCH_CHECK(p >= hi || p < lo, "decode_attention: new_k/new_v may not live in the KV storage");
    }
  }
}

// A float32 or float64 model over a cache of its own dtype or a 16-bit one.
template <typename QT>
void attend_model(const at::Tensor& q, at::Tensor& k, at::Tensor& v, const int64_t* off,
                  const int64_t* cnt, int64_t key_stride, int64_t head_stride, int64_t kv_heads,
                  const std::optional<at::Tensor>& new_k, const std::optional<at::Tensor>& new_v,
                  at::Tensor& out) {
  const Appended<QT> appended = appended_of<QT>(new_k, new_v);
  switch (k.scalar_type()) {
    case at::kBFloat16:
      attend<QT, c10::BFloat16>(q, k, v, off, cnt, key_stride, head_stride, kv_heads, appended,
                                out);
      break;
    case at::kHalf:
      attend<QT, c10::Half>(q, k, v, off, cnt, key_stride, head_stride, kv_heads, appended, out);
      break;
    default:
      attend<QT, QT>(q, k, v, off, cnt, key_stride, head_stride, kv_heads, appended, out);
  }
}

at::Tensor decode_attention(const at::Tensor& q, at::Tensor& k, at::Tensor& v,
                            const at::Tensor& offsets, const at::Tensor& counts,
                            int64_t key_stride, int64_t head_stride, int64_t kv_heads,
                            const std::optional<at::Tensor>& new_k,
                            const std::optional<at::Tensor>& new_v) {
  TORCH_CHECK(q.dim() == 3 && baton::has_dense_heads(q),
              "decode_attention: q must be (n, H, D) with dense heads (any row stride: a "
              "view of a fused projection's rows)");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.numel() == v.numel(),
              "decode_attention: k and v must be contiguous and the same size");
  const auto qt = q.scalar_type(), kt = k.scalar_type();
  const bool wide_q = qt == at::kFloat || qt == at::kDouble;
  TORCH_CHECK(kt == v.scalar_type() &&
                  (kt == qt || (wide_q && (kt == at::kBFloat16 || kt == at::kHalf))),
              "decode_attention: k and v must share q's dtype, or be bfloat16 or float16 "
              "under a float32 or float64 q");
  TORCH_CHECK(kv_heads > 0 && q.size(1) % kv_heads == 0,
              "decode_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(key_stride >= 1 && head_stride >= 0, "decode_attention: bad strides");
  const int64_t n = q.size(0), dim = q.size(2);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && counts.scalar_type() == at::kLong &&
                  offsets.is_contiguous() && counts.is_contiguous() &&
                  offsets.numel() == n && counts.numel() == n,
              "decode_attention: offsets and counts must be int64, one per query row");
  check_appended(q, k, v, kv_heads, new_k, new_v);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {  // every read (and the appended write) stays inside K and V
    TORCH_CHECK(cnt[r] >= 1 && off[r] >= 0 &&
                    off[r] + (cnt[r] - 1) * key_stride + (kv_heads - 1) * head_stride + dim <=
                        k.numel(),
                "decode_attention: row ", r, " reads outside the KV storage");
  }
  at::Tensor out = at::empty({n, q.size(1), dim}, q.options());
  switch (qt) {
    case at::kFloat:
      attend_model<float>(q, k, v, off, cnt, key_stride, head_stride, kv_heads, new_k, new_v, out);
      break;
    case at::kDouble:
      attend_model<double>(q, k, v, off, cnt, key_stride, head_stride, kv_heads, new_k, new_v,
                           out);
      break;
    case at::kBFloat16:
      attend<c10::BFloat16, c10::BFloat16>(q, k, v, off, cnt, key_stride, head_stride, kv_heads,
                                           appended_of<c10::BFloat16>(new_k, new_v), out);
      break;
    case at::kHalf:
      attend<c10::Half, c10::Half>(q, k, v, off, cnt, key_stride, head_stride, kv_heads,
                                   appended_of<c10::Half>(new_k, new_v), out);
      break;
    default:
      TORCH_CHECK(false, "decode_attention: q must be float32, float64, bfloat16 or float16");
  }
  return out;
}

}  // namespace

namespace baton {

at::Tensor decode_attention(const at::Tensor& q, at::Tensor& k, at::Tensor& v,
                            const at::Tensor& offsets, const at::Tensor& counts,
                            int64_t key_stride, int64_t head_stride, int64_t kv_heads,
                            const std::optional<at::Tensor>& new_k,
                            const std::optional<at::Tensor>& new_v) {
  return ::decode_attention(q, k, v, offsets, counts, key_stride, head_stride, kv_heads, new_k,
                            new_v);
}

}  // namespace baton

TORCH_LIBRARY(baton_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor(a!) k, Tensor(b!) v, Tensor offsets, Tensor counts, "
        "int key_stride, int head_stride, int kv_heads, Tensor? new_k=None, "
        "Tensor? new_v=None) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
