// Row-wise kernels for a decoder layer's small ops (included by native_layers.cpp): RMSNorm, attention of
// a few query rows over the K/V cache, and SiLU(gate) * up.
//
// Why: at batch 1 a layer's matmuls (panel_matmul.h) take ~30 us of the bundled model's ~90 us layer on
// one AMD EPYC host; most of the rest is ~30 ATen calls around them (norm: 6, attention with its views,
// mask and SDPA: ~15, activation: 3), each a dispatch and an allocation. A pass over several rows paid
// ~40 us a layer more for the attention mask and the masked SDPA path. Each kernel here is one loop over
// raw memory instead.
//
// Numerics: every output row is computed by the same instructions in the same order whatever the other
// rows are (a row's keys are its own causal window, its sums run over its own elements), so a position
// gets bit-identical results alone (a decode step) or inside a verification pass, as with the panels.
// The Python layer calls the same kernels (through the extension's bindings) wherever the C++ loop does,
// so the two stay bit-identical; they differ from torch's kernels by rounding only (tests bound it).

#pragma once

#include "panel_matmul.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace rows {

using panel_simd::vec;
using panel_simd::WIDTH;

// Lane-wise arithmetic and reductions per instruction set (panel_simd has loads, stores and fmadd).
// vround: to the nearest integer; vfnmadd(a, b, c) = c - a * b, fused; vpow2(n) = 2^n for integral n
// whose 2^n is a normal float (built in the exponent bits).
#if defined(__AVX512F__)
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vfnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// A fixed tree (GCC's _mm512_reduce_add_ps, spelled out so that every compiler adds alike and hsum16 can
// repeat it): lane i + lane i+8, then + lane i+4, then lanes i + i+2 of a quarter, then its lanes 0 + 1.
inline float hsum(vec v) {
  const __m256 halves = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
                                      _mm512_castps512_ps256(v));
  const __m128 quarter = _mm_add_ps(_mm256_extractf128_ps(halves, 1), _mm256_castps256_ps128(halves));
  const __m128 pairs = _mm_add_ps(quarter, _mm_shuffle_ps(quarter, quarter, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}
// hsum of 16 vectors at once, by the same additions on each (the same four steps, four vectors' lanes
// moved together): lane 4k + r of the result is hsum(v[4r + k]). A key's score costs ~1 shuffle and add
// instead of hsum's ~7.
inline vec hsum16(const vec* v) {
  vec halves[8], quarters[4], pairs[2];
  for (int m = 0; m < 8; ++m)  // 128-bit quarters [Q0 + Q2, Q1 + Q3] of v[2m], then of v[2m + 1]
    halves[m] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int m = 0; m < 4; ++m)  // quarter k: the halves' Q0 + Q1 of v[4m + k]
    quarters[m] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * m], halves[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(halves[2 * m], halves[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int m = 0; m < 2; ++m)  // quarter k: lanes [0 + 2, 1 + 3] of v[8m + k], then of v[8m + 4 + k]
    pairs[m] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * m], quarters[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(quarters[2 * m], quarters[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // quarter k: lanes 0 + 1 of v[k], v[4 + k], v[8 + k], v[12 + k]
  return _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
inline float hmax(vec v) { return _mm512_reduce_max_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vfnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float hsum(vec v) {  // a fixed tree: (lo + hi) halves down to one lane
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(vec v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#else
inline vec vmax(vec a, vec b) { return std::max(a, b); }
inline vec vmul(vec a, vec b) { return a * b; }
inline vec vdiv(vec a, vec b) { return a / b; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vsub(vec a, vec b) { return a - b; }
inline float hsum(vec v) { return v; }
inline float hmax(vec v) { return v; }
#endif

// exp(x) for a vector of x: 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 (Cody-Waite split,
// |r| <= 0.35), e^r by its Taylor series to r^7 (relative error < 3e-8 there). Inputs are clamped to
// [-87, 88], where 2^n is a normal float; e^-87 ~ 1.6e-38 is as good as zero for a softmax or a SiLU.
// One lane (no vector unit): std::exp.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
inline vec vexp(vec x) {
  using panel_simd::broadcast;
  x = vmax(vmin(x, broadcast(88.f)), broadcast(-87.f));
  const vec n = vround(vmul(x, broadcast(1.44269504088896341f)));
  vec r = vfnmadd(n, broadcast(0.693145751953125f), x);
  r = vfnmadd(n, broadcast(1.428606765330187e-06f), r);
  vec p = broadcast(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = panel_simd::fmadd(p, r, broadcast(c));
  return vmul(p, vpow2(n));
}
#else
inline vec vexp(vec x) { return std::exp(std::min(std::max(x, -87.f), 88.f)); }
#endif

// exp of one value by the same instructions as a vector lane of vexp.
inline float vexp_one(float x) {
#if defined(__AVX512F__)
  return _mm512_cvtss_f32(vexp(panel_simd::broadcast(x)));
#elif defined(__AVX2__) && defined(__FMA__)
  return _mm256_cvtss_f32(vexp(panel_simd::broadcast(x)));
#else
  return vexp(x);
#endif
}

// Sum of a[i] * b[i] over n elements: WIDTH-lane partial sums, then the lanes; a scalar tail after them.
inline float dot(const float* a, const float* b, int64_t n) {
  using namespace panel_simd;
  vec acc = zero();
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) acc = fmadd(load(a + i), load(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
}

#if defined(__AVX512F__)
// Scores of 16 consecutive keys (hd = NV * WIDTH floats each, compile-time so the partial sums stay in
// registers): out[j] = dot(q, key j) * scale, the same multiply-adds per key as dot, their lanes summed
// by hsum16 (the same additions as dot's hsum), so the same bits as dot.
template <int NV>
void scores16(const float* q, const float* keys, float scale, float* out) {
  using namespace panel_simd;
  constexpr int64_t hd = NV * WIDTH;
  vec qv[NV];
  for (int n = 0; n < NV; ++n) qv[n] = load(q + n * WIDTH);
  vec part[16];
  for (int m = 0; m < 16; ++m) {  // slot m holds key 4 (m % 4) + m / 4, so lane L of hsum16 is key L
    const float* k = keys + (4 * (m % 4) + m / 4) * hd;
    vec acc = zero();
    for (int n = 0; n < NV; ++n) acc = fmadd(qv[n], load(k + n * WIDTH), acc);
    part[m] = acc;
  }
  store(out, vmul(hsum16(part), broadcast(scale)));
}
#endif

// out[j] = dot(q, key j) * scale for S keys of hd floats each, one after another (16 at a time through
// scores16 where it serves: the same bits).
inline void scores(const float* q, const float* keys, int64_t S, int64_t hd, float scale, float* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  typedef void (*Scores16Fn)(const float*, const float*, float, float*);
  static const Scores16Fn by_vectors[4] = {scores16<1>, scores16<2>, scores16<3>, scores16<4>};
  const int64_t nv = hd % WIDTH == 0 ? hd / WIDTH : 0;
  if (nv >= 1 && nv <= 4)
    for (; j + 16 <= S; j += 16) by_vectors[nv - 1](q, keys + j * hd, scale, out + j);
#endif
  for (; j < S; ++j) out[j] = dot(q, keys + j * hd, hd) * scale;
}

// y += a * x over n elements.
inline void axpy(float a, const float* x, float* y, int64_t n) {
  using namespace panel_simd;
  const vec av = broadcast(a);
  int64_t i = 0;
  for (; i + WIDTH <= n; i += WIDTH) store(y + i, fmadd(av, load(x + i), load(y + i)));
  for (; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

// RMSNorm of `count` rows of width d (row stride ld_x, output rows contiguous):
// out = x * (1 / sqrt(mean(x^2) + eps)) * w, as transformers' LlamaRMSNorm computes it in fp32.
inline void rms_norm(const float* x, int64_t ld_x, int64_t count, int64_t d, const float* w, float eps, float* out) {
  for (int64_t r = 0; r < count; ++r) {
    const float* xr = x + r * ld_x;
    float* o = out + r * d;
    const float inv_rms = 1.f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) o[i] = xr[i] * inv_rms * w[i];
  }
}

// out (count, ff) = silu(gate) * up for rows laid out as [gate (ff) | up (ff)] with row stride ld_in;
// silu(g) = g / (1 + exp(-g)).
inline void silu_mul(const float* in, int64_t ld_in, int64_t count, int64_t ff, float* out) {
  using namespace panel_simd;
  const vec one = broadcast(1.f), minus_one = broadcast(-1.f);
  for (int64_t r = 0; r < count; ++r) {
    const float* g = in + r * ld_in;
    const float* u = g + ff;
    float* o = out + r * ff;
    int64_t i = 0;
    for (; i + WIDTH <= ff; i += WIDTH) {
      const vec gv = load(g + i);
      store(o + i, vmul(vdiv(gv, vadd(one, vexp(vmul(minus_one, gv)))), load(u + i)));
    }
    for (; i < ff; ++i) o[i] = g[i] / (1.f + std::exp(std::min(std::max(-g[i], -87.f), 88.f))) * u[i];
  }
}

// One row of logits x (width V >= 1): its maximum, the first index holding it (as torch's max(dim)) and
// sum_j exp(x[j] - max), the sum over WIDTH-lane partials in a fixed order. One pass for the maximum,
// one for the sum. False (nothing written) for a row holding a NaN or an infinity, left to torch.
inline bool softmax_stats(const float* x, int64_t V, float& top, int64_t& arg, float& sum) {
  using namespace panel_simd;
  // x * 0 is 0 for every finite x and NaN for a NaN or an infinity: one fmadd a vector flags both
  vec m = broadcast(x[0]), flag = zero();
  const vec nothing = zero();
  int64_t i = 0;
  for (; i + WIDTH <= V; i += WIDTH) {
    const vec xv = load(x + i);
    m = vmax(m, xv);
    flag = fmadd(xv, nothing, flag);
  }
  float best = hmax(m), flagged = hsum(flag);
  for (; i < V; ++i) {
    best = std::max(best, x[i]);
    flagged += x[i] * 0.f;
  }
  if (flagged != 0.f) return false;  // (true for NaN as well)
  int64_t first = 0;
  while (x[first] != best) ++first;  // best is one of the row's values
  const vec shift = broadcast(best);
  vec total = zero();
  i = 0;
  for (; i + WIDTH <= V; i += WIDTH) total = vadd(total, vexp(vsub(load(x + i), shift)));
  float s = hsum(total);
  for (; i < V; ++i) s += vexp_one(x[i] - best);
  top = best;
  arg = first;
  sum = s;
  return true;
}

// The greedy verifier's verdict on `count` rows of logits (width V, row stride ld): per row the argmax
// and the softmax probability of tokens[r], exp(x[t] - max) / sum_j exp(x[j] - max) (softmax_stats).
// At k = 8 rows of the bundled model's 8192 logits, torch's softmax, gather and max(dim) took ~70 us
// back to back and ~235 us a round inside the decode loop. Returns false (nothing written past the rows
// done) when a row holds a NaN or an infinity, or a token is outside [0, V).
inline bool greedy_verdict(const float* logits, int64_t ld, int64_t count, int64_t V, const int64_t* tokens,
                           int64_t* best, float* p_token) {
  if (V < 1) return false;
  for (int64_t r = 0; r < count; ++r) {
    const float* x = logits + r * ld;
    if (tokens[r] < 0 || tokens[r] >= V) return false;
    float top, sum;
    if (!softmax_stats(x, V, top, best[r], sum)) return false;
    p_token[r] = vexp_one(x[tokens[r]] - top) / sum;
  }
  return true;
}

// A greedy draft per row: the argmax and its softmax probability (the draft's confidence), the same
// arithmetic as greedy_verdict judging the argmax itself. Replaces torch's softmax, max(dim) and the
// dtype copies after them in each draft pass (~4 calls, several us each at batch 1).
inline bool greedy_rows(const float* logits, int64_t ld, int64_t count, int64_t V, int64_t* best, float* p_best) {
  if (V < 1) return false;
  for (int64_t r = 0; r < count; ++r) {
    const float* x = logits + r * ld;
    float top, sum;
    if (!softmax_stats(x, V, top, best[r], sum)) return false;
    p_best[r] = vexp_one(x[best[r]] - top) / sum;
  }
  return true;
}

// Where the query rows, the keys and the output live. Query row t of head h starts at
// q + t * q_row + h * q_head. `keys` / `values` point at position key_start of kv head 0 of one layer's
// cache: positions one after another (hd floats each), kv heads kv_head floats apart. The output is
// (T, heads * hd), contiguous.
struct AttentionArgs {
  const float* q;
  int64_t q_row, q_head;
  const float* keys;
  const float* values;
  int64_t kv_head;
  int64_t T, heads, kv_heads, hd;
  int64_t pos;        // position of query row 0; row t is at pos + t and sees keys up to pos + t
  int64_t key_start;  // the first position `keys` holds
  int64_t window;     // sliding window (a row sees its last `window` positions), or -1 for all
  float scale;        // softmax scale
  float* out;
};

// Causal softmax attention of T query rows: row t, head h attends to keys (pos + t - window, pos + t] of
// kv head h / (heads / kv_heads) (grouped-query heads share a kv head, as SDPA's enable_gqa). The
// softmax is exp(s - max) / sum, its sums over WIDTH-lane partials then across lanes, in a fixed order.
//
// Work is shared among torch's threads by (head, block of ATTENTION_ROW_BLOCK rows) once there is enough
// of it (ATTENTION_WORK_PER_THREAD query-key products per thread): a verification's rows had run on one
// core while the other idled. Measured on the bundled model, layers 3-8 over 6 rows, back to back: 582
// against 696 us at position 150, 337 against 363 us at position 60.
//
// The weighted sum of the values keeps a block's output rows in registers and reads each value row once
// for all of them (value_sum): accumulating in memory, one key after another, made every row's sum a
// chain of store-to-load round trips, the larger part of the kernel's time.
//
// Every row is computed by the same instructions in the same order (its own keys, ascending) whichever
// rows share its block and whichever thread runs it, so the bits do not depend on T or the split.
constexpr int64_t ATTENTION_WORK_PER_THREAD = 16 * 1024;
constexpr int64_t ATTENTION_ROW_BLOCK = 4;  // rows whose outputs share the registers (4 x 2 vectors at hd = 32)

// out[r] = sum over key positions p in [first[r], last[r]] of w[r][p - first[r]] * value row p, for the
// block's ROWS rows, as fused multiply-adds in ascending p from zero, kept in registers (NV vectors a
// row: hd = NV * WIDTH; both compile-time, or the accumulators would live on the stack and every
// multiply-add wait on a store again). `values` points at the value row of key position key_start.
template <int NV, int ROWS>
void value_sum(const int64_t* first, const int64_t* last, float* const* w, const float* values, int64_t key_start,
               float* const* out) {
  using namespace panel_simd;
  constexpr int64_t hd = NV * WIDTH;
  vec acc[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = zero();
  int64_t lo = first[0], hi = last[0];
  for (int r = 1; r < ROWS; ++r) lo = std::min(lo, first[r]), hi = std::max(hi, last[r]);
  for (int64_t p = lo; p <= hi; ++p) {
    const float* v = values + (p - key_start) * hd;
    vec vp[NV];
    for (int n = 0; n < NV; ++n) vp[n] = load(v + n * WIDTH);
    for (int r = 0; r < ROWS; ++r) {
      if (p < first[r] || p > last[r]) continue;
      const vec weight = broadcast(w[r][p - first[r]]);
      for (int n = 0; n < NV; ++n) acc[r][n] = fmadd(weight, vp[n], acc[r][n]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int n = 0; n < NV; ++n) store(out[r] + n * WIDTH, acc[r][n]);
}

typedef void (*ValueSumFn)(const int64_t*, const int64_t*, float* const*, const float*, int64_t, float* const*);

// value_sum for hd = nv * WIDTH and `rows` rows (1..ATTENTION_ROW_BLOCK), or nullptr (then the plain loop).
inline ValueSumFn value_sum_for(int64_t nv, int64_t rows) {
  static const ValueSumFn table[4][ATTENTION_ROW_BLOCK] = {
      {value_sum<1, 1>, value_sum<1, 2>, value_sum<1, 3>, value_sum<1, 4>},
      {value_sum<2, 1>, value_sum<2, 2>, value_sum<2, 3>, value_sum<2, 4>},
      {value_sum<3, 1>, value_sum<3, 2>, value_sum<3, 3>, value_sum<3, 4>},
      {value_sum<4, 1>, value_sum<4, 2>, value_sum<4, 3>, value_sum<4, 4>}};
  return nv >= 1 && nv <= 4 && rows >= 1 && rows <= ATTENTION_ROW_BLOCK ? table[nv - 1][rows - 1] : nullptr;
}

inline void attention(const AttentionArgs& a) {
  using namespace panel_simd;
  const int64_t group = a.heads / a.kv_heads;
  const int64_t most_keys = a.pos + a.T - a.key_start;  // no row sees more (window or not)
  const int64_t blocks = (a.T + ATTENTION_ROW_BLOCK - 1) / ATTENTION_ROW_BLOCK;
  const int64_t items = a.heads * blocks;  // (head, block of rows)
  const int64_t block_work = std::min(a.T, ATTENTION_ROW_BLOCK) * most_keys * a.hd;
  const int64_t grain = std::max<int64_t>(1, ATTENTION_WORK_PER_THREAD / std::max<int64_t>(1, block_work));
  const int64_t nv = a.hd % WIDTH == 0 ? a.hd / WIDTH : 0;  // value_sum's vectors a row, 0: the plain loop
  at::parallel_for(0, items, grain, [&](int64_t first_item, int64_t end_item) {
    const int64_t stride = most_keys + WIDTH;
    std::vector<float> weights(static_cast<size_t>(ATTENTION_ROW_BLOCK * stride));
    int64_t first[ATTENTION_ROW_BLOCK], last[ATTENTION_ROW_BLOCK];
    float* w[ATTENTION_ROW_BLOCK];
    float* o[ATTENTION_ROW_BLOCK];
    float sums[ATTENTION_ROW_BLOCK];
    for (int64_t item = first_item; item < end_item; ++item) {
      const int64_t h = item / blocks, t0 = (item % blocks) * ATTENTION_ROW_BLOCK;
      const int64_t rows = std::min(ATTENTION_ROW_BLOCK, a.T - t0);
      const float* k = a.keys + (h / group) * a.kv_head;
      const float* v = a.values + (h / group) * a.kv_head;
      for (int64_t r = 0; r < rows; ++r) {  // scores and softmax weights of row t0 + r
        const int64_t t = t0 + r;
        last[r] = a.pos + t;
        first[r] = a.window < 0 ? a.key_start : std::max<int64_t>(a.key_start, last[r] - a.window + 1);
        w[r] = weights.data() + r * stride;
        o[r] = a.out + t * a.heads * a.hd + h * a.hd;
        const int64_t S = last[r] - first[r] + 1;
        const int64_t padded = (S + WIDTH - 1) / WIDTH * WIDTH;
        const float* q = a.q + t * a.q_row + h * a.q_head;
        const float* kr = k + (first[r] - a.key_start) * a.hd;
        float* wr = w[r];
        scores(q, kr, S, a.hd, a.scale, wr);
        for (int64_t j = S; j < padded; ++j) wr[j] = wr[0];  // padding that cannot change the max
        vec m = load(wr);
        for (int64_t j = WIDTH; j < padded; j += WIDTH) m = vmax(m, load(wr + j));
        const vec top = broadcast(hmax(m));
        for (int64_t j = 0; j < padded; j += WIDTH) store(wr + j, vexp(vsub(load(wr + j), top)));
        vec total = zero();
        for (int64_t j = 0; j + WIDTH < padded; j += WIDTH) total = vadd(total, load(wr + j));
        float sum = hsum(total);
        for (int64_t j = padded - WIDTH; j < S; ++j) sum += wr[j];  // the last chunk's real lanes, one by one
        sums[r] = sum;
      }
      if (ValueSumFn sum_values = value_sum_for(nv, rows)) {  // unnormalised outputs: weights x value rows
        sum_values(first, last, w, v, a.key_start, o);
      } else {  // other head sizes: the same sums, one row at a time in memory
        for (int64_t r = 0; r < rows; ++r) {
          std::fill(o[r], o[r] + a.hd, 0.f);
          const float* vr = v + (first[r] - a.key_start) * a.hd;
          for (int64_t j = 0; j <= last[r] - first[r]; ++j) axpy(w[r][j], vr + j * a.hd, o[r], a.hd);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / sums[r];
        for (int64_t i = 0; i < a.hd; ++i) o[r][i] *= inv;
      }
    }
  });
}

}  // namespace rows
