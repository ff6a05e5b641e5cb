// Small-batch fp32 matmul on weights packed into column panels (included by native_layers.cpp).
//
// Why: batch-1 decoding and speculative verification multiply 1-16 rows by every weight matrix. BLAS
// sgemm is built for large matrices: at 1-16 rows it re-packs the weights on every call and, for an
// (in, out) layout with a wide row (the 8192-column LM head), walks the matrix with a 32 KB stride. On
// one AMD EPYC (Zen 4) host, 9 rows through the bundled model's 192 x 8192 head took 0.67-0.83 ms with
// torch.mm and 0.28 ms here; a decode step's 45 matrices (20 MB, streamed from memory), 1.50 ms against
// 0.45 ms. Packing once at load time makes every call one sequential sweep over the weights.
//
// Layout: (in, out) weights (K, N) become panels (ceil(N / PANEL), K, PANEL): the K rows of PANEL
// consecutive columns stored one after another, the last panel zero-padded.
//
// Numerics: out[m, n] = fma(x[m, K-1], w[K-1, n], ... fma(x[m, 0], w[0, n], 0)), in k order, for every
// element whatever the number of rows or the blocking. So a position gets bit-identical results alone
// (a decode step) or among others (a verification pass), and the Python layer and the C++ loop, which
// both call this, agree bit for bit. The bias, then the residual, are added after the sum.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#if defined(__AVX512F__)
#include <immintrin.h>
namespace panel_simd {
typedef __m512 vec;
constexpr int WIDTH = 16;
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec zero() { return _mm512_setzero_ps(); }
inline vec broadcast(float a) { return _mm512_set1_ps(a); }
inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void pin(vec& v) { asm volatile("" : "+v"(v)); }  // see tile()
}  // namespace panel_simd
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
namespace panel_simd {
typedef __m256 vec;
constexpr int WIDTH = 8;
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec zero() { return _mm256_setzero_ps(); }
inline vec broadcast(float a) { return _mm256_set1_ps(a); }
inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void pin(vec& v) { asm volatile("" : "+v"(v)); }  // see tile()
}  // namespace panel_simd
#else  // any other CPU: one lane, the same fused multiply-add per element
namespace panel_simd {
typedef float vec;
constexpr int WIDTH = 1;
inline vec load(const float* p) { return *p; }
inline void store(float* p, vec v) { *p = v; }
inline vec zero() { return 0.f; }
inline vec broadcast(float a) { return a; }
inline vec fmadd(vec a, vec b, vec c) { return std::fma(a, b, c); }
inline void pin(vec&) {}
}  // namespace panel_simd
#endif

namespace panel {

constexpr int VECTORS = 2;                                  // vectors per panel row
constexpr int64_t PANEL = panel_simd::WIDTH * VECTORS;      // columns per panel
constexpr int64_t MAX_TILE_ROWS = 12;                       // rows per register tile (24 accumulators)
constexpr int64_t SMALL_ROWS = 16;                          // more rows than this: BLAS does better
constexpr int64_t BYTES_PER_THREAD = 128 * 1024;            // smaller matrices run on one thread

// Rows [0, ROWS) of x (leading dimension ldx) times one panel (K, PANEL) -> out_tile (ROWS, PANEL).
template <int ROWS>
void tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* out_tile) {
  using namespace panel_simd;
  vec acc[ROWS][VECTORS];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < VECTORS; ++j) acc[i][j] = zero();
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += PANEL) {
    vec wk[VECTORS];
    for (int j = 0; j < VECTORS; ++j) {
      wk[j] = load(w + j * WIDTH);
      // Keep the weights in a register for all ROWS multiply-adds. Left alone, GCC folds the load into
      // each fmadd for ROWS <= 4, so a 4-row tile loaded every weight vector four times: rows 3-4 then
      // ran at ~70 GFLOP/s a core against ~100 from 5 rows on (192 x 8192, 4 rows: 186 us, 5 rows: 155).
      pin(wk[j]);
    }
    for (int i = 0; i < ROWS; ++i) {
      const vec xk = broadcast(x[i * ldx + k]);
      for (int j = 0; j < VECTORS; ++j) acc[i][j] = fmadd(xk, wk[j], acc[i][j]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < VECTORS; ++j) store(out_tile + i * PANEL + j * WIDTH, acc[i][j]);
}

typedef void (*TileFn)(const float*, int64_t, const float*, int64_t, float*);
inline TileFn tile_for(int64_t rows) {
  static const TileFn table[MAX_TILE_ROWS + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>,
                                                  tile<7>, tile<8>, tile<9>, tile<10>, tile<11>, tile<12>};
  return table[rows];
}

// (in, out) fp32 weights packed into panels once, used while the source is unchanged.
class PackedWeight {
 public:
  // source: a (K, N) fp32 view, e.g. LeanModel's (in, out) views or the LM head's rows transposed.
  explicit PackedWeight(at::Tensor source) : source_(std::move(source)) {
    TORCH_CHECK(source_.dim() == 2 && source_.scalar_type() == at::kFloat && source_.device().is_cpu(),
                "PackedWeight: a 2-D fp32 CPU matrix");
    K_ = source_.size(0);
    N_ = source_.size(1);
    panels_ = at::zeros({(N_ + PANEL - 1) / PANEL, K_, PANEL}, source_.options());
    repack(0, N_);
  }

  // Re-copy source columns [start, end) into the panels (after the owner wrote them) and mark fresh.
  void repack(int64_t start, int64_t end) {
    TORCH_CHECK(0 <= start && start <= end && end <= N_, "PackedWeight.repack: bad column range");
    if (start < end) {
      // Plain copies rather than a narrow / copy_ per panel: packing a 2304-column draft head took ~0.9 ms
      // of tensor calls, once per speculative request (and again whenever its shortlist grows).
      // (A transposed source, the LM head's (V, d) rows read as (d, V), keeps the strided tensor copy.)
      const bool rows_contiguous = source_.stride(1) == 1;
      const float* src = source_.data_ptr<float>();
      float* dst = panels_.data_ptr<float>();
      const int64_t ld = source_.stride(0);
      const int64_t first = start / PANEL, last = (end - 1) / PANEL;
      for (int64_t p = first; p <= last; ++p) {
        const int64_t c0 = std::max(start, p * PANEL), c1 = std::min(end, (p + 1) * PANEL);
        // panels_[p, k, c0 - p*PANEL : c1 - p*PANEL] = source_[k, c0:c1] for every row k
        if (!rows_contiguous) {
          panels_.select(0, p).narrow(1, c0 - p * PANEL, c1 - c0).copy_(source_.narrow(1, c0, c1 - c0));
          continue;
        }
        const size_t bytes = static_cast<size_t>(c1 - c0) * sizeof(float);
        float* panel = dst + p * K_ * PANEL + (c0 - p * PANEL);
        for (int64_t k = 0; k < K_; ++k) std::memcpy(panel + k * PANEL, src + k * ld + c0, bytes);
      }
    }
    version_ = version_of(source_);
  }

  // False when the source was written in place since packing (then the caller uses BLAS on the source),
  // or x is not something the panels serve: 1..SMALL_ROWS contiguous fp32 rows, nothing recording autograd.
  bool serves(const at::Tensor& x) const {
    return x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= SMALL_ROWS && x.size(1) == K_ &&
           x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.device().is_cpu() &&
           !(at::GradMode::is_enabled() && (x.requires_grad() || source_.requires_grad())) &&
           version_of(source_) == version_;
  }

  // x (M, K) @ W[:, :columns] (+ bias) (+ residual) -> (M, columns); columns = -1: all N.
  at::Tensor mm(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor* residual,
                int64_t columns = -1) const {
    const int64_t N = columns < 0 ? N_ : columns;
    TORCH_CHECK(N <= N_, "PackedWeight.mm: more columns than packed");
    const int64_t M = x.size(0);
    at::Tensor out = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const float* pp = panels_.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t ldx = x.stride(0), panels = (N + PANEL - 1) / PANEL;
    const int64_t panel_bytes = K_ * PANEL * static_cast<int64_t>(sizeof(float));
    const int64_t grain = std::max<int64_t>(1, BYTES_PER_THREAD / panel_bytes);
    at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
      alignas(64) float tile_out[MAX_TILE_ROWS * PANEL];
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * PANEL, width = std::min<int64_t>(PANEL, N - n0);
        for (int64_t m0 = 0; m0 < M; m0 += MAX_TILE_ROWS) {
          const int64_t rows = std::min<int64_t>(MAX_TILE_ROWS, M - m0);
          tile_for(rows)(xp + m0 * ldx, ldx, pp + p * K_ * PANEL, K_, tile_out);
          for (int64_t i = 0; i < rows; ++i)
            std::memcpy(op + (m0 + i) * N + n0, tile_out + i * PANEL, width * sizeof(float));
        }
      }
    });
    if (bias) out.add_(bias->narrow(0, 0, N));
    if (residual != nullptr) out.add_(*residual);
    return out;
  }

 private:
  static int64_t version_of(const at::Tensor& t) {
    return t.is_inference() ? 0 : static_cast<int64_t>(t._version());  // inference tensors keep no counter
  }

  at::Tensor source_, panels_;
  int64_t K_ = 0, N_ = 0, version_ = 0;
};

}  // namespace panel
