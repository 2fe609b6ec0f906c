// Causal attention of packed prompts (prefill), each over its own keys: float32 or bfloat16
// queries, keys and values, float32 arithmetic, on AVX2 + FMA.
//
// Why: a prefill pass attends every prompt causally to itself. torch's CPU flash kernel runs
// each (prompt, head) as a series of small library GEMMs with a softmax between them and, on
// the prompt lengths a serving workload has (16-256 tokens), reached 25-55 GFLOP/s of the
// causal work on a 2-core Zen 3 host (about 9% of a prefill pass's time); its blocks also
// score keys past a query's position inside the block it skips at. This kernel scores only
// the keys each query sees, with the GQA group folded in (the query heads of a group share
// each key load), on the register tile of the engine's sgemm (packed_sgemm.cpp).
//
// Segments: segment s has `length` queries at rows `q_row..` of q (N, H, D), at positions
// `past..past+length-1`, and its keys and values start at element `key_offset` of K and V,
// key j of KV head h at `key_offset + j * key_stride + h * head_stride`, so BATON's staging
// area, Orca's head-major pool and the default per-request slabs are all read in place (k and
// v may be any views with unit last stride; reads stay inside their storage). Query
// i sees keys 0..past+i: a new prompt (past 0) and a prompt resumed after cached keys both
// without a mask. The output is (sum of lengths, H, D), the segments in order.
//
// Work: the rows of one (segment, KV head) are its queries' (position, group head) pairs in
// that order, cut into tiles of up to 6 rows. A task is one tile: its rows' scores against
// 16-key panels of K^T (packed once per segment and head), a softmax per row over the keys
// that row sees, then the probabilities times V (read in place, 16 features at a time).
// Tasks go to threads from a shared counter, longest first, because causal tiles grow.
//
// Exactness: each row's score is one FMA chain over D, its softmax and its sum over keys in
// key order, whichever tile or thread computes it and whatever other segments the call has,
// so a prompt's output does not depend on what it is batched with, nor on where its prefill
// was cut. It differs from SDPA by float32 rounding (q is scaled before the dot product).
//
// bfloat16: the same float32 arithmetic on widened inputs (a shift: bfloat16 is float32's
// upper half), the keys widened once when they are packed into panels, the values as they
// are read, and each output rounded to nearest even once, as torch's casts round. torch's
// bfloat16 flash kernel also scores and sums in float32; on a 2-core Zen 4 it took 14% of a
// bfloat16 prefill pass, twice this kernel's float32 time.
//
// bfloat16 on AVX-512 BF16 (head size a multiple of 32): `vdpbf16ps` multiplies bfloat16
// pairs into float32 sums at twice the float32 FMA's rate, so both products run on it. The
// scores' products are exact in float32 (they differ from the widened path only by the order
// of float32 additions); the probabilities are rounded to bfloat16 before they weight the
// values, as torch's bfloat16 flash kernel rounds them, while their sum stays float32. K^T
// panels hold each key's feature pairs (d, d+1) as stored, one 32-bit word per key and pair;
// values are packed as pairs of consecutive keys per feature, (v[j][d], v[j+1][d]), so two
// keys' probabilities are one broadcast word. Each row's scores, sum and output are still
// one chain in key order, so the invariances above hold bit for bit on this path too.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "softmax_exp.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BATON_PROMPT_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__)
#define BATON_PROMPT_DPBF16 1
#endif
#endif

namespace {

constexpr int64_t kTileRows = 6;  // rows of a tile: 12 accumulators of 8 floats
constexpr int64_t kPanel = 16;    // keys per K^T panel, features per V pass

bool prompt_attention_available() {
#ifdef BATON_PROMPT_AVX2
  return true;
#else
  return false;
#endif
}

struct Segment {
  int64_t q_row, length, past, key_offset;
};

struct Task {
  int64_t segment, kv_head, row0, rows, keys;  // keys: those the tile's last row sees
};

// Elements from t's first one to the end of its storage.
int64_t elements_after(const at::Tensor& t) {
  return static_cast<int64_t>(t.storage().nbytes()) / t.element_size() - t.storage_offset();
}

#ifdef BATON_PROMPT_AVX2

// 8 values as float32: loaded, or widened from bfloat16 (float32's upper half).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// 16 float32 outputs stored, or rounded to bfloat16 (nearest even, as torch's casts).
inline void store16(float* out, __m256 lo, __m256 hi) {
  _mm256_storeu_ps(out, lo);
  _mm256_storeu_ps(out + 8, hi);
}
inline void store16(c10::BFloat16* out, __m256 lo, __m256 hi) {
  alignas(32) float wide[16];
  store16(wide, lo, hi);
  for (int i = 0; i < 16; ++i) out[i] = c10::BFloat16(wide[i]);
}

// Scores of ROWS query rows (D floats each, scaled) against one K^T panel: a 6 x 16 tile.
#define BATON_SCORE_FMA(r)                                            \
  if constexpr (ROWS > r) {                                           \
    const __m256 qv = _mm256_broadcast_ss(q + r * dim + d);           \
    acc##r##lo = _mm256_fmadd_ps(qv, k_lo, acc##r##lo);               \
    acc##r##hi = _mm256_fmadd_ps(qv, k_hi, acc##r##hi);               \
  }
#define BATON_SCORE_STORE(r)                                          \
  if constexpr (ROWS > r) {                                           \
    _mm256_storeu_ps(scores + r * lds, acc##r##lo);                   \
    _mm256_storeu_ps(scores + r * lds + 8, acc##r##hi);               \
  }

template <int ROWS>
void score_panel(const float* q, int64_t dim, const float* panel, float* scores, int64_t lds) {
  __m256 acc0lo = _mm256_setzero_ps(), acc0hi = acc0lo, acc1lo = acc0lo, acc1hi = acc0lo,
         acc2lo = acc0lo, acc2hi = acc0lo, acc3lo = acc0lo, acc3hi = acc0lo, acc4lo = acc0lo,
         acc4hi = acc0lo, acc5lo = acc0lo, acc5hi = acc0lo;
  for (int64_t d = 0; d < dim; ++d) {
    const __m256 k_lo = _mm256_loadu_ps(panel + d * kPanel);
    const __m256 k_hi = _mm256_loadu_ps(panel + d * kPanel + 8);
    BATON_SCORE_FMA(0) BATON_SCORE_FMA(1) BATON_SCORE_FMA(2)
    BATON_SCORE_FMA(3) BATON_SCORE_FMA(4) BATON_SCORE_FMA(5)
  }
  BATON_SCORE_STORE(0) BATON_SCORE_STORE(1) BATON_SCORE_STORE(2)
  BATON_SCORE_STORE(3) BATON_SCORE_STORE(4) BATON_SCORE_STORE(5)
}
#undef BATON_SCORE_FMA
#undef BATON_SCORE_STORE

// 16 output features of ROWS rows: probabilities (`keys` per row) times V's 16 columns.
#define BATON_VALUE_FMA(r)                                            \
  if constexpr (ROWS > r) {                                           \
    const __m256 pv = _mm256_broadcast_ss(probs + r * ldp + j);       \
    acc##r##lo = _mm256_fmadd_ps(pv, v_lo, acc##r##lo);               \
    acc##r##hi = _mm256_fmadd_ps(pv, v_hi, acc##r##hi);               \
  }
#define BATON_VALUE_STORE(r)                                                        \
  if constexpr (ROWS > r) {                                                         \
    const __m256 s = _mm256_set1_ps(inv_sums[r]);                                   \
    store16(out[r], _mm256_mul_ps(acc##r##lo, s), _mm256_mul_ps(acc##r##hi, s));    \
  }

template <int ROWS, typename T>
void value_panel(const float* probs, int64_t ldp, int64_t keys, const T* v,
                 int64_t key_stride, const float* inv_sums, T* const* out) {
  __m256 acc0lo = _mm256_setzero_ps(), acc0hi = acc0lo, acc1lo = acc0lo, acc1hi = acc0lo,
         acc2lo = acc0lo, acc2hi = acc0lo, acc3lo = acc0lo, acc3hi = acc0lo, acc4lo = acc0lo,
         acc4hi = acc0lo, acc5lo = acc0lo, acc5hi = acc0lo;
  for (int64_t j = 0; j < keys; ++j) {
    const __m256 v_lo = load8(v + j * key_stride);
    const __m256 v_hi = load8(v + j * key_stride + 8);
    BATON_VALUE_FMA(0) BATON_VALUE_FMA(1) BATON_VALUE_FMA(2)
    BATON_VALUE_FMA(3) BATON_VALUE_FMA(4) BATON_VALUE_FMA(5)
  }
  BATON_VALUE_STORE(0) BATON_VALUE_STORE(1) BATON_VALUE_STORE(2)
  BATON_VALUE_STORE(3) BATON_VALUE_STORE(4) BATON_VALUE_STORE(5)
}
#undef BATON_VALUE_FMA
#undef BATON_VALUE_STORE

template <int ROWS>
void score_tile(const float* q, int64_t dim, const float* panels, int64_t num_panels,
                float* scores, int64_t lds) {
  for (int64_t p = 0; p < num_panels; ++p)
    score_panel<ROWS>(q, dim, panels + p * dim * kPanel, scores + p * kPanel, lds);
}

template <int ROWS, typename T>
void value_tile(const float* probs, int64_t ldp, int64_t keys, const T* v, int64_t dim,
                int64_t key_stride, const float* inv_sums, T* const* out) {
  T* cols[kTileRows];
  for (int64_t c = 0; c < dim; c += kPanel) {
    for (int r = 0; r < ROWS; ++r) cols[r] = out[r] + c;
    value_panel<ROWS, T>(probs, ldp, keys, v + c, key_stride, inv_sums, cols);
  }
}

// Replaces a row's first `seen` scores by exp(score - max) and the rest up to `keys` by 0;
// returns 1 / their sum.
float softmax_row(float* s, int64_t seen, int64_t keys) {
  __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= seen; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float top = *std::max_element(lanes, lanes + 8);
  for (; j < seen; ++j) top = std::max(top, s[j]);
  const __m256 m = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= seen; j += 8) {
    const __m256 e = baton::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  _mm256_store_ps(lanes, sum8);
  float sum = 0;
  for (float lane : lanes) sum += lane;
  for (; j < seen; ++j) {
    s[j] = baton::exp_nonpositive(s[j] - top);
    sum += s[j];
  }
  std::fill(s + seen, s + keys, 0.0f);
  return 1.0f / sum;
}

// One tile: rows `row0..row0+rows-1` of a (segment, KV head), row r being the query at
// position `past + r / group` of head `kv_head * group + r % group`.
template <int ROWS, typename T>
void run_tile(const Task& t, const Segment& seg, const T* q, int64_t q_row_stride,
              int64_t q_head_stride, const float* panels, const T* v, int64_t key_stride,
              int64_t head_stride, int64_t group, int64_t dim, float scale, T* out,
              int64_t out_row, int64_t heads, float* scratch, int64_t lds) {
  float* q_tile = scratch;                    // ROWS x dim, float32, scaled
  float* scores = scratch + kTileRows * dim;  // ROWS x lds
  T* rows_out[kTileRows];
  float inv_sums[kTileRows];
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = t.row0 + r, i = row / group, h = t.kv_head * group + row % group;
    const T* src = q + (seg.q_row + i) * q_row_stride + h * q_head_stride;
    for (int64_t d = 0; d < dim; ++d) q_tile[r * dim + d] = static_cast<float>(src[d]) * scale;
    rows_out[r] = out + ((out_row + i) * heads + h) * dim;
  }
  score_tile<ROWS>(q_tile, dim, panels, (t.keys + kPanel - 1) / kPanel, scores, lds);
  for (int r = 0; r < ROWS; ++r) {
    const int64_t seen = seg.past + (t.row0 + r) / group + 1;
    inv_sums[r] = softmax_row(scores + r * lds, seen, t.keys);
  }
  value_tile<ROWS, T>(scores, lds, t.keys, v + seg.key_offset + t.kv_head * head_stride, dim,
                   key_stride, inv_sums, rows_out);
}

// Every (segment, KV head)'s rows cut into even tiles of 1-6 rows, longest first.
std::vector<Task> make_tasks(const std::vector<Segment>& segs, int64_t kv_heads, int64_t group) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(segs.size()); ++s) {
    const int64_t rows = segs[s].length * group;
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t r0 = 0, tiles = (rows + kTileRows - 1) / kTileRows; tiles > 0; --tiles) {
        const int64_t n = (rows - r0 + tiles - 1) / tiles;  // even tiles of 1-6 rows
        tasks.push_back({s, h, r0, n, segs[s].past + (r0 + n - 1) / group + 1});
        r0 += n;
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.keys * a.rows > b.keys * b.rows; });
  return tasks;
}

// Runs `tile(task, rows, scratch)` for every task on the torch threads, which take tasks from
// a shared counter in order; `rows` is the tile's row count as a compile-time constant
// (`std::integral_constant`), `scratch` what `make_scratch` made once per thread.
template <typename MakeScratch, typename Tile>
void run_tasks(const std::vector<Task>& tasks, MakeScratch make_scratch, Tile tile) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks.size());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t w = next++; w < static_cast<int64_t>(tasks.size()); w = next++) {
      const Task& t = tasks[w];
      switch (t.rows) {
        case 6: tile(t, std::integral_constant<int, 6>{}, scratch); break;
        case 5: tile(t, std::integral_constant<int, 5>{}, scratch); break;
        case 4: tile(t, std::integral_constant<int, 4>{}, scratch); break;
        case 3: tile(t, std::integral_constant<int, 3>{}, scratch); break;
        case 2: tile(t, std::integral_constant<int, 2>{}, scratch); break;
        default: tile(t, std::integral_constant<int, 1>{}, scratch); break;
      }
    }
  });
}

#endif  // BATON_PROMPT_AVX2

#ifdef BATON_PROMPT_DPBF16

using Word = uint32_t;  // two bfloat16: the lower one at the lower address

inline Word pair_at(const c10::BFloat16* p) {
  Word w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

inline __m512bh broadcast_pair(const c10::BFloat16* p) {
  return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair_at(p)));
}

// acc[r][n] = the sum over `depth` steps k of the bfloat16 pair at `rows[r] + 2k` times the
// 16 pairs at `b + k * b_step + n * b_stride`: ROWS x N accumulators of 16 float32 lanes, each
// one chain over k. Both products of a tile are this: scores over K^T panels and outputs
// over pair-packed values.
template <int ROWS, int N>
inline void dp_accumulate(const c10::BFloat16* const* rows, int64_t depth, const Word* b,
                          int64_t b_step, int64_t b_stride, __m512 (&acc)[ROWS][N]) {
  for (int r = 0; r < ROWS; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    __m512bh cols[N];
    for (int n = 0; n < N; ++n)
      cols[n] = (__m512bh)_mm512_loadu_si512(b + k * b_step + n * b_stride);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh pair = broadcast_pair(rows[r] + 2 * k);
      for (int n = 0; n < N; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], pair, cols[n]);
    }
  }
}

// Scores of ROWS query rows (bfloat16, unscaled) against NP K^T panels of 16 keys, each
// `pairs` words deep.
template <int ROWS, int NP>
void score_panels_dp(const c10::BFloat16* const* q, int64_t pairs, const Word* panel,
                     int64_t panel_words, float scale, float* scores, int64_t lds) {
  __m512 acc[ROWS][NP];
  dp_accumulate<ROWS, NP>(q, pairs, panel, kPanel, panel_words, acc);
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < ROWS; ++r)
    for (int p = 0; p < NP; ++p)
      _mm512_storeu_ps(scores + r * lds + p * kPanel, _mm512_mul_ps(acc[r][p], s));
}

// NC x 16 output features from `d0` of ROWS rows: bfloat16 probabilities (`ldp` apart) of
// `key_pairs` key pairs times the pair-packed values (`dim` words per key pair).
template <int ROWS, int NC>
void value_chunk_dp(const c10::BFloat16* probs, int64_t ldp, int64_t key_pairs,
                    const Word* values, int64_t dim, int64_t d0, const float* inv_sums,
                    c10::BFloat16* const* out) {
  const c10::BFloat16* rows[ROWS];
  for (int r = 0; r < ROWS; ++r) rows[r] = probs + r * ldp;
  __m512 acc[ROWS][NC];
  dp_accumulate<ROWS, NC>(rows, key_pairs, values + d0, dim, kPanel, acc);
  for (int r = 0; r < ROWS; ++r) {
    const __m512 s = _mm512_set1_ps(inv_sums[r]);
    for (int c = 0; c < NC; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + d0 + c * kPanel),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], s)));
  }
}

// One tile (see run_tile) on the bfloat16 dot products. `panels`: the (segment, KV head)'s K^T
// panels, then its pair-packed values.
template <int ROWS>
void run_tile_dp(const Task& t, const Segment& seg, const c10::BFloat16* q, int64_t q_row_stride,
                 int64_t q_head_stride, const Word* panels, const Word* values, int64_t group,
                 int64_t dim, float scale, c10::BFloat16* out, int64_t out_row, int64_t heads,
                 float* scores, c10::BFloat16* probs, int64_t lds) {
  const c10::BFloat16* q_rows[kTileRows];
  c10::BFloat16* rows_out[kTileRows];
  float inv_sums[kTileRows];
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = t.row0 + r, i = row / group, h = t.kv_head * group + row % group;
    q_rows[r] = q + (seg.q_row + i) * q_row_stride + h * q_head_stride;
    rows_out[r] = out + ((out_row + i) * heads + h) * dim;
  }
  const int64_t pairs = dim / 2, panel_words = pairs * kPanel;
  const int64_t num_panels = (t.keys + kPanel - 1) / kPanel;
  int64_t p = 0;
  for (; p + 2 <= num_panels; p += 2)
    score_panels_dp<ROWS, 2>(q_rows, pairs, panels + p * panel_words, panel_words, scale,
                             scores + p * kPanel, lds);
  if (p < num_panels)
    score_panels_dp<ROWS, 1>(q_rows, pairs, panels + p * panel_words, panel_words, scale,
                             scores + p * kPanel, lds);
  const int64_t width = num_panels * kPanel;
  for (int r = 0; r < ROWS; ++r) {
    const int64_t seen = seg.past + (t.row0 + r) / group + 1;
    float* s = scores + r * lds;
    inv_sums[r] = softmax_row(s, seen, width);
    for (int64_t j = 0; j < width; j += kPanel)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + r * lds + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + j)));
  }
  const int64_t key_pairs = (t.keys + 1) / 2;
  int64_t d0 = 0;
  for (; d0 + 4 * kPanel <= dim; d0 += 4 * kPanel)
    value_chunk_dp<ROWS, 4>(probs, lds, key_pairs, values, dim, d0, inv_sums, rows_out);
  if (d0 < dim)  // dim is a multiple of 32
    value_chunk_dp<ROWS, 2>(probs, lds, key_pairs, values, dim, d0, inv_sums, rows_out);
}

// attend_segments for bfloat16 on the dot products. Per (segment, KV head), `head_words`
// words at `word_offsets[s] + h * head_words`: the K^T panels (`padded * dim / 2` words), then
// the pair-packed values (as many), both zero past the segment's keys.
void attend_segments_dp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::vector<Segment>& segs, const std::vector<int64_t>& out_rows,
                        const std::vector<int64_t>& word_offsets, int64_t total_words,
                        int64_t widest, int64_t key_stride, int64_t head_stride, int64_t kv_heads,
                        at::Tensor& out) {
  using T = c10::BFloat16;
  const int64_t heads = q.size(1), dim = q.size(2), group = heads / kv_heads, pairs = dim / 2;
  const int64_t num_segments = static_cast<int64_t>(segs.size());
  at::Tensor packed = at::empty({total_words}, q.options().dtype(at::kInt));
  Word* wp = reinterpret_cast<Word*>(packed.data_ptr<int32_t>());
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  at::parallel_for(0, num_segments * kv_heads, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t s = w / kv_heads, h = w % kv_heads, keys = segs[s].past + segs[s].length;
      const int64_t padded = (keys + kPanel - 1) / kPanel * kPanel;
      Word* panels = wp + word_offsets[s] + h * padded * dim;
      Word* values = panels + padded * pairs;
      const int64_t base = segs[s].key_offset + h * head_stride;
      for (int64_t j = 0; j < padded; ++j) {
        Word* col = panels + (j / kPanel) * pairs * kPanel + j % kPanel;
        const T* key = kp + base + j * key_stride;
        for (int64_t d = 0; d < pairs; ++d) col[d * kPanel] = j < keys ? pair_at(key + 2 * d) : 0;
      }
      for (int64_t j = 0; j < padded; j += 2) {
        Word* dst = values + (j / 2) * dim;
        const T* v0 = vp + base + j * key_stride;
        const T* v1 = v0 + key_stride;
        for (int64_t d = 0; d < dim; ++d) {
          const Word lo = j < keys ? v0[d].x : 0;
          const Word hi = j + 1 < keys ? v1[d].x : 0;
          dst[d] = lo | (hi << 16);
        }
      }
    }
  });
  std::vector<Task> tasks = make_tasks(segs, kv_heads, group);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t lds = widest;
  struct Scratch {
    std::vector<float> scores;
    std::vector<T> probs;
  };
  const auto make_scratch = [&] {
    return Scratch{std::vector<float>(kTileRows * lds), std::vector<T>(kTileRows * lds)};
  };
  run_tasks(tasks, make_scratch, [&](const Task& t, auto rows, Scratch& scratch) {
    const Segment& seg = segs[t.segment];
    const int64_t keys = seg.past + seg.length;
    const int64_t padded = (keys + kPanel - 1) / kPanel * kPanel;
    const Word* panels = wp + word_offsets[t.segment] + t.kv_head * padded * dim;
    run_tile_dp<decltype(rows)::value>(t, seg, qp, q.stride(0), q.stride(1), panels,
                                       panels + padded * pairs, group, dim, scale, op,
                                       out_rows[t.segment], heads, scratch.scores.data(),
                                       scratch.probs.data(), lds);
  });
}

#endif  // BATON_PROMPT_DPBF16

#ifdef BATON_PROMPT_AVX2

// The kernel proper, for q, k, v and the output all of type T (float or c10::BFloat16).
template <typename T>
void attend_segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::vector<Segment>& segs, const std::vector<int64_t>& out_rows,
                     const std::vector<int64_t>& panel_offsets, int64_t panel_floats,
                     int64_t widest, int64_t key_stride, int64_t head_stride, int64_t kv_heads,
                     at::Tensor& out) {
  const int64_t heads = q.size(1), dim = q.size(2), group = heads / kv_heads;
  const int64_t num_segments = static_cast<int64_t>(segs.size());
  // K^T of every (segment, KV head) as 16-key float32 panels (padded keys score 0, unused).
  at::Tensor panels = at::empty({panel_floats}, q.options().dtype(at::kFloat));
  float* pp = panels.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  at::parallel_for(0, num_segments * kv_heads, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t s = w / kv_heads, h = w % kv_heads, keys = segs[s].past + segs[s].length;
      const int64_t padded = (keys + kPanel - 1) / kPanel * kPanel;
      float* dst = pp + panel_offsets[s] + h * padded * dim;
      for (int64_t j = 0; j < padded; ++j) {
        const T* src = kp + segs[s].key_offset + j * key_stride + h * head_stride;
        float* col = dst + (j / kPanel) * dim * kPanel + j % kPanel;
        for (int64_t d = 0; d < dim; ++d)
          col[d * kPanel] = j < keys ? static_cast<float>(src[d]) : 0.0f;
      }
    }
  });
  std::vector<Task> tasks = make_tasks(segs, kv_heads, group);
  const T* qp = q.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t lds = widest;
  const auto make_scratch = [&] { return std::vector<float>(kTileRows * (dim + lds)); };
  run_tasks(tasks, make_scratch, [&](const Task& t, auto rows, std::vector<float>& scratch) {
    const Segment& seg = segs[t.segment];
    const int64_t keys = seg.past + seg.length;
    const float* panel = pp + panel_offsets[t.segment] +
                         t.kv_head * ((keys + kPanel - 1) / kPanel * kPanel) * dim;
    run_tile<decltype(rows)::value, T>(t, seg, qp, q.stride(0), q.stride(1), panel, vp,
                                       key_stride, head_stride, group, dim, scale, op,
                                       out_rows[t.segment], heads, scratch.data(), lds);
  });
}

#endif  // BATON_PROMPT_AVX2

at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& segments, int64_t key_stride, int64_t head_stride,
                            int64_t kv_heads) {
  TORCH_CHECK(prompt_attention_available(),
              "prompt_attention: built without AVX2 and FMA");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(q.dim() == 3 && (q.scalar_type() == at::kFloat || bf16) && q.stride(2) == 1,
              "prompt_attention: q must be a float32 or bfloat16 (N, H, D) with unit last "
              "stride");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  k.dim() >= 1 && k.stride(-1) == 1 && k.sizes() == v.sizes() &&
                  k.strides() == v.strides(),
              "prompt_attention: k and v must be views of q's dtype, of one shape and strides, "
              "unit last stride");
  // Keys are addressed from k's first element up to the end of its storage (and v's).
  const int64_t readable = std::min(elements_after(k), elements_after(v));
  const int64_t heads = q.size(1), dim = q.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0,
              "prompt_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(dim % kPanel == 0 && dim > 0,
              "prompt_attention: head size must be a multiple of 16");
  TORCH_CHECK(key_stride >= dim && head_stride >= 0, "prompt_attention: bad strides");
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 4 &&
                  segments.scalar_type() == at::kLong && segments.is_contiguous(),
              "prompt_attention: segments must be an int64 (S, 4) of q_row, length, past, "
              "key_offset");
  const int64_t num_segments = segments.size(0);
  std::vector<Segment> segs(num_segments);
  std::vector<int64_t> out_rows(num_segments), panel_offsets(num_segments);
  int64_t total = 0, panel_floats = 0, widest = 0;
  const int64_t* sp = segments.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_segments; ++s) {
    const Segment seg{sp[4 * s], sp[4 * s + 1], sp[4 * s + 2], sp[4 * s + 3]};
    const int64_t keys = seg.past + seg.length;
    TORCH_CHECK(seg.length >= 1 && seg.past >= 0 && seg.q_row >= 0 &&
                    seg.q_row + seg.length <= q.size(0),
                "prompt_attention: segment ", s, " has bad rows");
    TORCH_CHECK(seg.key_offset >= 0 &&
                    seg.key_offset + (keys - 1) * key_stride + (kv_heads - 1) * head_stride +
                            dim <= readable,
                "prompt_attention: segment ", s, " reads outside the KV storage");
    segs[s] = seg;
    out_rows[s] = total;
    panel_offsets[s] = panel_floats;
    total += seg.length;
    const int64_t padded = (keys + kPanel - 1) / kPanel * kPanel;
    panel_floats += kv_heads * padded * dim;
    widest = std::max(widest, padded);
  }
  at::Tensor out = at::empty({total, heads, dim}, q.options());
#ifdef BATON_PROMPT_AVX2
  if (total == 0) return out;
#ifdef BATON_PROMPT_DPBF16
  if (bf16 && dim % (2 * kPanel) == 0) {  // K^T and V in words: as many as the panels' floats
    attend_segments_dp(q, k, v, segs, out_rows, panel_offsets, panel_floats, widest, key_stride,
                       head_stride, kv_heads, out);
    return out;
  }
#endif
  if (bf16)
    attend_segments<c10::BFloat16>(q, k, v, segs, out_rows, panel_offsets, panel_floats, widest,
                                   key_stride, head_stride, kv_heads, out);
  else
    attend_segments<float>(q, k, v, segs, out_rows, panel_offsets, panel_floats, widest,
                           key_stride, head_stride, kv_heads, out);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(baton_kernels, m) {
  m.def("prompt_attention_available() -> bool", TORCH_FN(prompt_attention_available));
  m.def("prompt_attention(Tensor q, Tensor k, Tensor v, Tensor segments, int key_stride, "
        "int head_stride, int kv_heads) -> Tensor");
  m.impl("prompt_attention", c10::DispatchKey::CPU, TORCH_FN(prompt_attention));
}
