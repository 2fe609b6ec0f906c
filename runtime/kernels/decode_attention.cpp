// Single-query (decode) attention over keys that stay where the KV layout keeps them.
//
// Each query row r attends to `counts[r]` keys starting at element `offsets[r]` of the layer's
// K and V storage, key j of KV head h at `offsets[r] + j * key_stride + h * head_stride`. That
// addresses BATON's dense rows (a row's real keys are the last columns of its bucket window)
// and Orca's per-request slot ranges alike, without gathering, padding or a mask: only real
// keys are read. GQA: the `H / H_kv` query heads of a group share one pass over their KV head.
//
// One task per (row, KV head), spread over ATen's thread pool: scores, softmax and the
// weighted values, each streaming the keys (or values) once. The float path uses AVX2/FMA
// when the build targets it (runtime/attention_kernels.py compiles per ISA); a portable loop
// serves float64 (exact tests) and other CPUs. Why hand-written: torch's CPU flash kernel
// runs tiny per-block GEMMs for one query row and reached a third of this machine's memory
// bandwidth on decode; this loop reaches most of it (docs/benchmarks.md).
//
// Optionally (`new_k`, `new_v`) each row's decode token's key and value are first written to
// the row's last key position, inside the same task: the layout's per-layer cache write
// without a separate indexed copy per bucket.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BATON_AVX2 1
#endif

namespace {

// e^x for x <= 0 (softmax after its max is subtracted): 2^(x log2 e) = 2^i 2^f with f in
// [-0.5, 0.5] and 2^f from the degree-6 Taylor series of e^(f ln 2) (relative error ~1e-7).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.4426950408889634f;
  const float i = std::nearbyint(t);
  const float f = (t - i) * 0.6931471805599453f;
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(i) * (1 << 23);
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// --- portable loops (any dtype, any head size) ---------------------------------------------

template <typename T>
void scores_portable(const T* q, int64_t group, int64_t dim, const T* k, int64_t key_stride,
                     int64_t count, T scale, T* scores) {
  for (int64_t j = 0; j < count; ++j) {
    const T* kj = k + j * key_stride;
    for (int64_t g = 0; g < group; ++g) {
      const T* qg = q + g * dim;
      T dot = 0;
      for (int64_t d = 0; d < dim; ++d) dot += qg[d] * kj[d];
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

template <typename T>
void weighted_values_portable(const T* probs, int64_t group, int64_t count, const T* v,
                              int64_t key_stride, int64_t dim, T* acc) {
  for (int64_t j = 0; j < count; ++j) {
    const T* vj = v + j * key_stride;
    for (int64_t g = 0; g < group; ++g) {
      const T p = probs[g * count + j];
      T* ag = acc + g * dim;
      for (int64_t d = 0; d < dim; ++d) ag[d] += p * vj[d];
    }
  }
}

#ifdef BATON_AVX2
// --- AVX2/FMA float loops (head size a multiple of 8) ---------------------------------------

inline float horizontal_sum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 i = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, i), _mm256_set1_ps(0.6931471805599453f));
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(i), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

void scores_avx2(const float* q, int64_t group, int64_t dim, const float* k,
                 int64_t key_stride, int64_t count, float scale, float* scores) {
  for (int64_t j = 0; j < count; ++j) {
    const float* kj = k + j * key_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 16 <= dim; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kj + d), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d + 8), _mm256_loadu_ps(kj + d + 8), a1);
      }
      if (d < dim) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kj + d), a0);
      scores[g * count + j] = horizontal_sum(_mm256_add_ps(a0, a1)) * scale;
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

// acc_g[d0, d0 + 8 NV) += sum_j p[g, j] v_j[d0, d0 + 8 NV), accumulators held in registers
// over blocks of keys small enough for their values to stay in L1 across the group.
template <int NV>
void weighted_values_chunk(const float* probs, int64_t group, int64_t count, const float* v,
                           int64_t key_stride, int64_t d0, int64_t dim, float* acc) {
  constexpr int64_t kBlock = 64;
  for (int64_t j0 = 0; j0 < count; j0 += kBlock) {
    const int64_t j1 = std::min(count, j0 + kBlock);
    for (int64_t g = 0; g < group; ++g) {
      __m256 a[NV];
      float* ag = acc + g * dim + d0;
      for (int i = 0; i < NV; ++i) a[i] = _mm256_loadu_ps(ag + 8 * i);
      const float* pg = probs + g * count;
      for (int64_t j = j0; j < j1; ++j) {
        const __m256 p = _mm256_broadcast_ss(pg + j);
        const float* vj = v + j * key_stride + d0;
        for (int i = 0; i < NV; ++i) a[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * i), a[i]);
      }
      for (int i = 0; i < NV; ++i) _mm256_storeu_ps(ag + 8 * i, a[i]);
    }
  }
}

void weighted_values_avx2(const float* probs, int64_t group, int64_t count, const float* v,
                          int64_t key_stride, int64_t dim, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 64 <= dim; d0 += 64)
    weighted_values_chunk<8>(probs, group, count, v, key_stride, d0, dim, acc);
  switch ((dim - d0) / 8) {
    case 1: weighted_values_chunk<1>(probs, group, count, v, key_stride, d0, dim, acc); break;
    case 2: weighted_values_chunk<2>(probs, group, count, v, key_stride, d0, dim, acc); break;
    case 3: weighted_values_chunk<3>(probs, group, count, v, key_stride, d0, dim, acc); break;
    case 4: weighted_values_chunk<4>(probs, group, count, v, key_stride, d0, dim, acc); break;
    case 5: weighted_values_chunk<5>(probs, group, count, v, key_stride, d0, dim, acc); break;
    case 6: weighted_values_chunk<6>(probs, group, count, v, key_stride, d0, dim, acc); break;
    case 7: weighted_values_chunk<7>(probs, group, count, v, key_stride, d0, dim, acc); break;
    default: break;
  }
}
#endif  // BATON_AVX2

// One (row, KV head): out_g = softmax(scale q_g K^T) V for the group's query heads.
template <typename T>
void attend_one(const T* q, const T* k, const T* v, int64_t group, int64_t dim,
                int64_t key_stride, int64_t count, T scale, T* scores, T* acc, T* out) {
  std::fill(acc, acc + group * dim, T(0));
#ifdef BATON_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (dim % 8 == 0) {
      scores_avx2(q, group, dim, k, key_stride, count, scale, scores);
      for (int64_t g = 0; g < group; ++g) {
        const float norm = 1.0f / softmax_numerators_avx2(scores + g * count, count);
        for (int64_t j = 0; j < count; ++j) scores[g * count + j] *= norm;
      }
      weighted_values_avx2(scores, group, count, v, key_stride, dim, acc);
      std::copy(acc, acc + group * dim, out);
      return;
    }
  }
#endif
  scores_portable(q, group, dim, k, key_stride, count, scale, scores);
  for (int64_t g = 0; g < group; ++g) {
    const T norm = T(1) / softmax_numerators_portable(scores + g * count, count);
    for (int64_t j = 0; j < count; ++j) scores[g * count + j] *= norm;
  }
  weighted_values_portable(scores, group, count, v, key_stride, dim, acc);
  std::copy(acc, acc + group * dim, out);
}

// The decode token's own key and value, `(n, H_kv, D)` with any row/head strides, written to
// each row's last key position before the row attends: the layout's per-layer cache write
// done inside the same task instead of as separate indexed copies.
template <typename T>
struct Appended {
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t k_row = 0, k_head = 0, v_row = 0, v_head = 0;
};

template <typename T>
void attend(const at::Tensor& q, at::Tensor& k, at::Tensor& v, const int64_t* offsets,
            const int64_t* counts, int64_t key_stride, int64_t head_stride, int64_t kv_heads,
            const Appended<T>& appended, at::Tensor& out) {
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t group = heads / kv_heads;
  const int64_t widest = n ? *std::max_element(counts, counts + n) : 0;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dim)));
  const T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(group * widest), acc(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t first = offsets[r] + h * head_stride;
      if (appended.k != nullptr) {  // only this task touches row r's head h
        const int64_t last = first + (counts[r] - 1) * key_stride;
        std::copy_n(appended.k + r * appended.k_row + h * appended.k_head, dim, kp + last);
        std::copy_n(appended.v + r * appended.v_row + h * appended.v_head, dim, vp + last);
      }
      const int64_t at = (r * heads + h * group) * dim;
      attend_one<T>(qp + at, kp + first, vp + first, group, dim, key_stride, counts[r], scale,
                    scores.data(), acc.data(), op + at);
    }
  });
}

template <typename T>
Appended<T> appended_of(const std::optional<at::Tensor>& new_k,
                        const std::optional<at::Tensor>& new_v) {
  Appended<T> a;
  if (new_k.has_value()) {
    a.k = new_k->data_ptr<T>();
    a.v = new_v->data_ptr<T>();
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
    TORCH_CHECK(t->scalar_type() == k.scalar_type(),
                "decode_attention: new_k/new_v must share the cache's dtype");
    const auto* p = static_cast<const char*>(t->data_ptr());
    for (const at::Tensor* cache : {&k, &v}) {
      const auto* lo = static_cast<const char*>(cache->data_ptr());
      const auto* hi = lo + cache->numel() * cache->element_size();
      TORCH_CHECK(p >= hi || p < lo, "decode_attention: new_k/new_v may not live in the KV storage");
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, at::Tensor& k, at::Tensor& v,
                            const at::Tensor& offsets, const at::Tensor& counts,
                            int64_t key_stride, int64_t head_stride, int64_t kv_heads,
                            const std::optional<at::Tensor>& new_k,
                            const std::optional<at::Tensor>& new_v) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "decode_attention: q must be a contiguous (n, H, D)");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.numel() == v.numel(),
              "decode_attention: k and v must be contiguous and the same size");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "decode_attention: q, k and v must share a dtype");
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
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    attend<float>(q, k, v, off, cnt, key_stride, head_stride, kv_heads,
                  appended_of<float>(new_k, new_v), out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kDouble, "decode_attention: float32 or float64 only");
    attend<double>(q, k, v, off, cnt, key_stride, head_stride, kv_heads,
                   appended_of<double>(new_k, new_v), out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(baton_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor(a!) k, Tensor(b!) v, Tensor offsets, Tensor counts, "
        "int key_stride, int head_stride, int kv_heads, Tensor? new_k=None, "
        "Tensor? new_v=None) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
