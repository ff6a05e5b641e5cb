// The decoder-layer loop of adaptive/model.py (LeanModel.layer), written against ATen from C++.
//
// Why: at batch 1 on a CPU a layer is ~35 small torch calls, and from Python each one pays argument
// parsing and a Python tensor object on top of the kernel itself. Calling the same ATen functions from
// C++ skips that. Every call below is the one LeanModel.layer makes, in the same order and on the same
// views, so the results are bit-identical to the Python path (tests/test_native_layers.py checks
// equality, not closeness); only the interpreter overhead between them goes away.
//
// Scope: what LeanModel.layer does without its two extras, left-padded batch rows (``pads``) and
// replayed propagate K/V (``kv_source``), which stay in Python. The cache's fill-level bookkeeping also
// stays in Python (KVCache.check_write / mark_filled) so that there is one place that enforces it.

#include <torch/extension.h>

#include "draft_round.h"
#include "panel_matmul.h"
#include "row_kernels.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;
using at::Tensor;
using OptTensor = std::optional<Tensor>;
using panel::PackedWeight;
using Packed = std::shared_ptr<PackedWeight>;

namespace {

// x (N, in) @ wt (+ b) (+ residual), for a weight given as its (in, out) transpose: model.py's project.
// A few rows go through the weight's panels (panel_matmul.h) when it has them and they are fresh; wt may
// be the first columns of what was packed (a shortlist head with spare columns).
Tensor project(const Tensor& x, const Tensor& wt, const OptTensor& b, const Tensor* residual = nullptr,
               const Packed& packed = nullptr) {
  if (packed && packed->serves(x)) return packed->mm(x, b, residual, wt.size(1));
  if (residual == nullptr) {
    return b ? at::addmm(*b, x, wt) : at::mm(x, wt);
  }
  Tensor out = at::addmm(*residual, x, wt);
  return b ? out.add_(*b) : out;
}

// RoPE on q and k together, qk (B, heads, T, hd) (any strides) with the frame's rows cos, sin (T, hd):
// out = qk * cos + rotate_half(qk) * sin, rotate_half(x) = cat(-x[hd/2:], x[:hd/2]). One pass instead of
// a mul, a batched matmul by the rotation matrix and an addcmul (~25 us a layer at batch 1, measured).
// fp32 only (the caller checks); model.py's _qkv calls it too, so both paths stay bit-identical.
Tensor rope(const Tensor& qk, const Tensor& cos, const Tensor& sin) {
  const int64_t B = qk.size(0), Hs = qk.size(1), T = qk.size(2), hd = qk.size(3), half = hd / 2;
  TORCH_CHECK(qk.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
              cos.size(0) == T && cos.size(1) == hd && hd % 2 == 0, "rope: fp32 (B, heads, T, hd), cos/sin (T, hd)");
  Tensor x = qk.contiguous();
  Tensor out = at::empty({B, Hs, T, hd}, qk.options());
  const float* xp = x.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t row = 0; row < B * Hs * T; ++row) {
    const int64_t t = row % T;
    const float* xr = xp + row * hd;
    const float* cr = c + t * hd;
    const float* sr = s + t * hd;
    float* o = op + row * hd;
    for (int64_t i = 0; i < half; ++i) o[i] = xr[i] * cr[i] - xr[i + half] * sr[i];
    for (int64_t i = half; i < hd; ++i) o[i] = xr[i] * cr[i] + xr[i - half] * sr[i];
  }
  return out;
}

// Where ``rope`` serves: fp32 on the CPU, one set of RoPE rows for every batch row (no left padding),
// nothing recording autograd; elsewhere both paths use the rotation-matrix form.
bool rope_applies(const Tensor& qk, const OptTensor& cos) {
  return cos && qk.scalar_type() == at::kFloat && cos->dim() == 2 && qk.device().is_cpu() &&
         !(at::GradMode::is_enabled() && qk.requires_grad());
}

// The row kernels (row_kernels.h) serve fp32 CPU tensors with nothing recording autograd.
bool rows_serve(const Tensor& t) {
  return t.scalar_type() == at::kFloat && t.device().is_cpu() && !(at::GradMode::is_enabled() && t.requires_grad());
}

// RMSNorm of x (..., d) with weight w (d,) in one pass per row, or nullopt where the row kernels do not serve.
OptTensor rms_norm_rows(const Tensor& x, const Tensor& w, double eps) {
  if (!rows_serve(x) || !rows_serve(w) || x.dim() < 1 || !w.is_contiguous() || w.numel() != x.size(-1)) {
    return std::nullopt;
  }
  const Tensor xc = x.contiguous();
  const int64_t d = x.size(-1);
  Tensor out = at::empty(xc.sizes(), xc.options());
  rows::rms_norm(xc.data_ptr<float>(), d, d == 0 ? 0 : xc.numel() / d, d, w.data_ptr<float>(),
                 static_cast<float>(eps), out.data_ptr<float>());
  return out;
}

// Causal attention of q (1, H, T, hd) (any strides with contiguous rows) over keys / values
// (1, Hkv, S, hd), a cache layer's positions [key_start, pos + T): (T, H * hd), the layout the output
// projection reads, or nullopt where the row kernels do not serve (a batch, more than SMALL_ROWS rows,
// another layout). A prefill's many rows stay with SDPA, which blocks them better.
OptTensor attention_rows(const Tensor& q, const Tensor& keys, const Tensor& values, int64_t pos, int64_t key_start,
                         int64_t window, double scale) {
  if (!rows_serve(q) || !rows_serve(keys) || !rows_serve(values) || q.dim() != 4 || keys.dim() != 4 ||
      q.size(0) != 1 || keys.size(0) != 1 || q.size(2) < 1 || q.size(2) > panel::SMALL_ROWS || q.stride(3) != 1 ||
      q.size(3) != keys.size(3) || keys.stride(3) != 1 || keys.stride(2) != keys.size(3) ||
      !values.sizes().equals(keys.sizes()) || !values.strides().equals(keys.strides()) || keys.size(1) < 1 ||
      q.size(1) % keys.size(1) != 0 || keys.size(2) != pos + q.size(2) - key_start) {
    return std::nullopt;
  }
  const int64_t T = q.size(2), H = q.size(1), hd = q.size(3);
  Tensor out = at::empty({T, H * hd}, q.options());
  rows::attention({q.data_ptr<float>(), q.stride(2), q.stride(1), keys.data_ptr<float>(), values.data_ptr<float>(),
                   keys.stride(1), T, H, keys.size(1), hd, pos, key_start, window, static_cast<float>(scale),
                   out.data_ptr<float>()});
  return out;
}

// silu(gate) * up for rows (N, 2 ff) laid out [gate | up]: (N, ff), or nullopt where the kernels do not serve.
OptTensor silu_mul_rows(const Tensor& gate_up) {
  if (!rows_serve(gate_up) || gate_up.dim() != 2 || gate_up.stride(1) != 1 || gate_up.size(1) % 2 != 0) {
    return std::nullopt;
  }
  const int64_t N = gate_up.size(0), ff = gate_up.size(1) / 2;
  Tensor out = at::empty({N, ff}, gate_up.options());
  rows::silu_mul(gate_up.data_ptr<float>(), gate_up.stride(0), N, ff, out.data_ptr<float>());
  return out;
}

// Logits the greedy row kernels read: 1..SMALL_ROWS fp32 CPU rows (T, n), each contiguous.
bool logit_rows_serve(const Tensor& logits) {
  return rows_serve(logits) && logits.dim() == 2 && logits.size(0) >= 1 && logits.size(0) <= panel::SMALL_ROWS &&
         logits.stride(1) == 1;
}

// The greedy verdict on logits (k, V) for the drafted tokens (k of them): (argmax per row, softmax
// probability of each row's token), or nullopt where the kernel does not serve (not fp32 rows on the
// CPU, more than SMALL_ROWS rows, a token out of range, a NaN or an infinity): speculative.py's _accept
// then uses torch.
std::optional<std::pair<std::vector<int64_t>, std::vector<double>>> greedy_verdict_rows(
    const Tensor& logits, const std::vector<int64_t>& tokens) {
  const int64_t k = static_cast<int64_t>(tokens.size());
  if (!logit_rows_serve(logits) || logits.size(0) != k) return std::nullopt;
  std::vector<int64_t> best(k);
  std::vector<float> p(k);
  if (!rows::greedy_verdict(logits.data_ptr<float>(), logits.stride(0), k, logits.size(1), tokens.data(),
                            best.data(), p.data())) {
    return std::nullopt;
  }
  return std::make_pair(best, std::vector<double>(p.begin(), p.end()));
}

// Greedy drafts from logits (T, n): (argmax per row, its softmax probability), or nullopt where the
// kernel does not serve (as greedy_verdict_rows). speculative.py's Python draft pass calls it, so the
// Python and C++ passes give the same confidences bit for bit.
std::optional<std::pair<std::vector<int64_t>, std::vector<double>>> greedy_rows(const Tensor& logits) {
  if (!logit_rows_serve(logits)) return std::nullopt;
  const int64_t T = logits.size(0);
  std::vector<int64_t> best(T);
  std::vector<float> p(T);
  if (!rows::greedy_rows(logits.data_ptr<float>(), logits.stride(0), T, logits.size(1), best.data(), p.data())) {
    return std::nullopt;
  }
  return std::make_pair(best, std::vector<double>(p.begin(), p.end()));
}

}  // namespace

// What NativeModel::draft_round drafted: the fields of speculative.py's Draft it fills, and per pass
// what the Python bookkeeping after the round needs (MACs, the controller's pass timings).
struct DraftRound {
  Tensor hidden;  // (1, k, d): hidden states after the draft's layers for t0..t_{k-1}
  std::vector<int64_t> tokens;
  std::vector<double> confidences, predicted;  // max draft probability, predicted acceptance, per draft
  std::string stop;
  std::vector<int64_t> pass_rows, pass_used;  // per pass: positions fed, drafts kept
  std::vector<double> pass_ms;                // per pass: its time with the choices around it
  int64_t guessed = 0, agreed = 0, compared = 0;  // drafts that came from guesses; guessed tokens judged
  double rest_ms = 0.0;                       // time after the first pass
};

// One decoder layer's tensors. Projections are (in, out) views, as LeanModel._mm holds them; a layer
// has either the fused qkv / gate_up matrices or the separate ones (weights shared with another model).
struct NativeLayer {
  Tensor attn_norm_w, mlp_norm_w, o_t, down_t;
  OptTensor attn_norm_b, mlp_norm_b, o_b, down_b;
  OptTensor qkv_t, qkv_b, q_t, q_b, k_t, k_b, v_t, v_b;
  OptTensor gate_up_t, gate_up_b, gate_t, gate_b, up_t, up_b;
  Packed qkv_p, q_p, k_p, v_p, o_p, gate_up_p, gate_p, up_p, down_p;  // panels of the same weights, or null
  double scale;    // softmax scale
  int64_t window;  // sliding window, or -1 for full attention
};

// The K/V buffers of one KVCache: per-layer (B, Hkv, max_len, hd) tensors. Bound once per cache.
struct NativeKV {
  std::vector<Tensor> k, v;
  NativeKV(std::vector<Tensor> k_layers, std::vector<Tensor> v_layers)
      : k(std::move(k_layers)), v(std::move(v_layers)) {}
};

class NativeModel {
 public:
  NativeModel(std::vector<NativeLayer> layers, Tensor embed, OptTensor pos_embed, Tensor final_norm_w,
              OptTensor final_norm_b, OptTensor cos, OptTensor sin, OptTensor rotate,
              Tensor inv_width, Tensor norm_eps, double eps, std::string norm_kind, std::string activation,
              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim)
      : layers_(std::move(layers)), embed_(std::move(embed)), pos_embed_(std::move(pos_embed)),
        final_norm_w_(std::move(final_norm_w)), final_norm_b_(std::move(final_norm_b)),
        cos_(std::move(cos)), sin_(std::move(sin)), rotate_(std::move(rotate)),
        inv_width_(std::move(inv_width)), norm_eps_(std::move(norm_eps)), eps_(eps),
        norm_kind_(std::move(norm_kind)), activation_(std::move(activation)),
        H_(num_heads), Hkv_(num_kv_heads), hd_(head_dim) {
    TORCH_CHECK(norm_kind_ == "rms" || norm_kind_ == "layer", "unknown norm kind ", norm_kind_);
    TORCH_CHECK(activation_ == "silu" || activation_ == "gelu" || activation_ == "gelu_tanh",
                "unknown activation ", activation_);
  }

  // Layers [start, end) on hidden states h (B, T, d) of positions [pos, pos + T); writes their K/V.
  // The caller has checked that the cache holds positions [0, pos) of these layers and room up to pos + T.
  Tensor run_layers(Tensor h, int64_t start, int64_t end, int64_t pos, NativeKV& kv) const {
    TORCH_CHECK(0 <= start && start <= end && end <= static_cast<int64_t>(layers_.size()), "bad layer range");
    const int64_t B = h.size(0), T = h.size(1), d = h.size(2);
    OptTensor cos, sin;  // the frame's RoPE rows (T, hd), shared by every layer of the pass
    if (cos_) {
      cos = cos_->narrow(0, pos, T);
      sin = sin_->narrow(0, pos, T);
    }
    std::map<std::pair<int64_t, int64_t>, Tensor> masks;  // (key_start, window) -> (T, S), as Frame.mask
    for (int64_t index = start; index < end; ++index) {
      h = layer(index, h, B, T, d, pos, kv, cos, sin, masks);
    }
    return h;
  }

  // Greedy self-draft steps for a block of tokens (speculative.py's SelfDrafter with SpeculativeDecoder.draw):
  // tokens (T of them) at positions [pos, pos + T) through the embedding and layers [0, depth), the exit
  // adapter (if any), the final norm and a shortlist head (d, n) with its vocabulary ids (n,). Returns
  // (hidden after depth layers (1, T, d), per position the draft confidence = max softmax probability,
  // per position the drafted token id); the same calls as the Python. T = 1 is one draft step; T > 1
  // checks an n-gram guess of the next tokens in the same pass (SelfDrafter.draft).
  std::tuple<Tensor, std::vector<double>, std::vector<int64_t>> draft_greedy(
      const std::vector<int64_t>& tokens, int64_t pos, int64_t depth, NativeKV& kv,
      const OptTensor& adapter_w, const OptTensor& adapter_b, const Tensor& head_t,
      const Tensor& head_ids, const Packed& head_p) const {
    const int64_t T = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(T >= 1, "draft_greedy needs at least one token");
    Tensor h = embed_rows(tokens);  // (1, T, d): LeanModel.embed
    if (pos_embed_) h = h + pos_embed_->narrow(0, pos, T);
    h = run_layers(h, 0, depth, pos, kv);
    Tensor adapted = adapter_w ? h + at::linear(h, *adapter_w, adapter_b) : h;  // ExitHeads.adapt
    Tensor x = norm(adapted, final_norm_w_, final_norm_b_);
    Tensor logits = project(x.view({T, -1}), head_t, std::nullopt, nullptr, head_p);  // (T, n): ShortlistHead.rows_logits
    if (head_ids.scalar_type() == at::kLong && head_ids.is_contiguous() && head_ids.device().is_cpu()) {
      if (auto drafts = greedy_rows(logits)) {  // the row kernel: _python_pass calls the same one
        const int64_t* id = head_ids.data_ptr<int64_t>();
        std::vector<int64_t> chosen(T);
        for (int64_t r = 0; r < T; ++r) chosen[r] = id[drafts->first[r]];
        return {h, drafts->second, chosen};
      }
    }
    auto best = at::softmax(logits.to(at::kFloat), -1).max(-1);     // draw: one softmax, its max per row
    Tensor confidence = std::get<0>(best).to(at::kDouble).cpu().contiguous();
    Tensor chosen = head_ids.index_select(0, std::get<1>(best)).to(at::kLong).cpu().contiguous();
    const double* c = confidence.data_ptr<double>();
    const int64_t* t = chosen.data_ptr<int64_t>();
    return {h, std::vector<double>(c, c + T), std::vector<int64_t>(t, t + T)};
  }

  // A whole greedy self-drafted round from t0 at pos: passes of draft_greedy, each feeding the token to
  // draft after and a guess of the tokens after it, with the rules between passes (draft_round.h) that
  // SelfDrafter._draft_greedy applies in Python, in the same order. `context`: the committed tokens
  // (t0 excluded). Rows a pass fed after a rejected guess stay in the cache buffers as stale slots; the
  // caller marks layers [0, depth) filled up to pos + drafts, as the Python's crop leaves them.
  DraftRound draft_round(int64_t t0, int64_t pos, int64_t depth, NativeKV& kv, const OptTensor& adapter_w,
                         const OptTensor& adapter_b, const Tensor& head_t, const Tensor& head_ids,
                         const Packed& head_p, const std::vector<int64_t>& context, draft::Rules rules) const {
    using clock = std::chrono::steady_clock;
    const auto ms_since = [](clock::time_point t) {
      return std::chrono::duration<double, std::milli>(clock::now() - t).count();
    };
    DraftRound out;
    std::vector<int64_t> recent(context.end() - std::min<int64_t>(rules.max_ngram, context.size()), context.end());
    recent.push_back(t0);  // the sequence's last tokens, drafts included: the guesses' n-gram tail
    std::vector<Tensor> hiddens;
    clock::time_point rest_start;
    double survive = 1.0;
    int64_t token = t0;
    while (out.stop.empty()) {
      const auto started = clock::now();
      const int64_t j = static_cast<int64_t>(out.tokens.size());  // this pass's first row is position pos + j
      const int64_t room = std::min(rules.limit, rules.max_draft) - j - 1;
      const int64_t length = rules.guesses ? draft::guess_length(room, rules.beta(), rules.pass_ms) : 0;
      const std::vector<int64_t> tail(recent.end() - std::min<int64_t>(rules.max_ngram, recent.size()), recent.end());
      std::vector<int64_t> guess = draft::guess(context, tail, rules.max_ngram, rules.min_ngram, length);
      if (guess.empty()) guess = rules.store.propose(recent, length);  // the corpus's n-grams, if any
      std::vector<int64_t> fed{token};
      fed.insert(fed.end(), guess.begin(), guess.end());
      auto [h, confs, drafted] = draft_greedy(fed, pos + j, depth, kv, adapter_w, adapter_b, head_t, head_ids, head_p);
      const int64_t rows = static_cast<int64_t>(fed.size()), guessed = static_cast<int64_t>(guess.size());
      int64_t used = 0;
      bool missed = false;
      for (int64_t i = 0; i < rows; ++i) {
        ++used;
        out.tokens.push_back(drafted[i]);
        out.confidences.push_back(confs[i]);
        const double accept = rules.predict(confs[i]);
        out.predicted.push_back(accept);
        survive *= accept;
        out.guessed += i > 0;
        out.stop = rules.stop(drafted[i], static_cast<int64_t>(out.tokens.size()), survive);
        if (!out.stop.empty() || i == guessed) break;
        if (drafted[i] != guess[i]) {  // the next row was fed a token the draft did not choose
          missed = true;
          break;
        }
      }
      if (guessed > 0) {  // rows 1..used-1 were fed agreeing guesses; a miss was compared too
        rules.agreed += used - 1, rules.compared += used - 1 + missed;
        out.agreed += used - 1, out.compared += used - 1 + missed;
      }
      hiddens.push_back(h.narrow(1, 0, used));
      recent.insert(recent.end(), drafted.begin(), drafted.begin() + used);
      token = drafted[used - 1];
      out.pass_rows.push_back(rows);
      out.pass_used.push_back(used);
      out.pass_ms.push_back(ms_since(started));
      if (out.pass_rows.size() == 1) rest_start = clock::now();
    }
    out.hidden = hiddens.size() == 1 ? hiddens[0] : at::cat(hiddens, 1);
    out.rest_ms = ms_since(rest_start);
    return out;
  }

 private:
  Tensor norm(const Tensor& x, const Tensor& w, const OptTensor& b) const {
    const int64_t d = x.size(-1);
    if (norm_kind_ == "rms") {
      if (auto rows = rms_norm_rows(x, w, eps_)) return *rows;
      if (x.scalar_type() == at::kFloat) {  // model.py's fp32 RMSNorm: the same six calls
        Tensor mean_square = (x * x).sum(-1, true).mul_(inv_width_);
        return x * at::rsqrt(mean_square.add_(norm_eps_)) * w;
      }
      return at::rms_norm(x, {d}, w, eps_);
    }
    return at::layer_norm(x, {d}, w, b, eps_);
  }

  // F.embedding of one row of token ids: (1, T, d). The rows are copied straight from a contiguous CPU
  // table (the same values, without building an index tensor and dispatching embedding's index_select).
  Tensor embed_rows(const std::vector<int64_t>& tokens) const {
    const int64_t T = static_cast<int64_t>(tokens.size()), V = embed_.size(0), d = embed_.size(1);
    for (int64_t t : tokens) TORCH_CHECK(t >= 0 && t < V, "token id ", t, " is outside the vocabulary [0, ", V, ")");
    if (!embed_.device().is_cpu() || !embed_.is_contiguous()) {
      Tensor ids = at::tensor(tokens, at::TensorOptions().dtype(at::kLong)).to(embed_.device()).view({1, T});
      return at::embedding(embed_, ids);
    }
    Tensor h = at::empty({1, T, d}, embed_.options());
    const size_t row_bytes = static_cast<size_t>(d) * embed_.element_size();
    const char* table = static_cast<const char*>(embed_.data_ptr());
    char* out = static_cast<char*>(h.data_ptr());
    for (int64_t t = 0; t < T; ++t) std::memcpy(out + t * row_bytes, table + tokens[t] * row_bytes, row_bytes);
    return h;
  }

  Tensor act(const Tensor& x) const {
    if (activation_ == "silu") return at::silu(x);
    return at::gelu(x, activation_ == "gelu" ? "none" : "tanh");
  }

  Tensor attention_mask(int64_t pos, int64_t T, int64_t key_start, int64_t window, const Tensor& like) const {
    auto opts = at::TensorOptions().dtype(at::kLong).device(like.device());
    Tensor q_pos = at::arange(pos, pos + T, opts).unsqueeze(1);          // (T, 1)
    Tensor k_pos = at::arange(key_start, pos + T, opts).unsqueeze(0);    // (1, S)
    Tensor allowed = k_pos <= q_pos;
    if (window >= 0) allowed.bitwise_and_(k_pos > q_pos - window);
    return allowed;
  }

  // torch's SDPA where the row kernel does not serve: q (B, H, T, hd) over keys / values (B, Hkv, S, hd) of
  // positions [key_start, pos + T), with the pass's masks built once per (key_start, window).
  Tensor sdpa(const Tensor& q, const Tensor& keys, const Tensor& values, int64_t B, int64_t T, int64_t pos,
              int64_t key_start, int64_t window, double scale,
              std::map<std::pair<int64_t, int64_t>, Tensor>& masks) const {
    OptTensor mask;
    bool causal = false;
    if (T > 1) {
      if (key_start == 0 && pos == 0 && (window < 0 || window >= T)) {
        causal = true;
      } else {
        auto key = std::make_pair(key_start, window);
        auto found = masks.find(key);
        if (found == masks.end()) found = masks.emplace(key, attention_mask(pos, T, key_start, window, q)).first;
        mask = found->second;
      }
    }
    Tensor attn = at::scaled_dot_product_attention(q, keys, values, mask, 0.0, causal, scale, Hkv_ != H_);  // (B, H, T, hd)
    return attn.transpose(1, 2).reshape({B * T, H_ * hd_});  // (B*T, H*hd)
  }

  Tensor layer(int64_t index, Tensor h, int64_t B, int64_t T, int64_t d, int64_t pos, NativeKV& kv,
               const OptTensor& cos, const OptTensor& sin,
               std::map<std::pair<int64_t, int64_t>, Tensor>& masks) const {
    const NativeLayer& lw = layers_[index];
    h = h.view({B * T, d});  // (B*T, d)

    // q (B, H, T, hd), k and v (B, Hkv, T, hd), RoPE applied: model.py's _qkv
    Tensor x = norm(h, lw.attn_norm_w, lw.attn_norm_b);
    Tensor qkv = lw.qkv_t ? project(x, *lw.qkv_t, lw.qkv_b, nullptr, lw.qkv_p)
                          : at::cat({project(x, *lw.q_t, lw.q_b, nullptr, lw.q_p),
                                     project(x, *lw.k_t, lw.k_b, nullptr, lw.k_p),
                                     project(x, *lw.v_t, lw.v_b, nullptr, lw.v_p)}, -1);  // (B*T, (H+2Hkv)*hd)
    qkv = qkv.view({B, T, H_ + 2 * Hkv_, hd_}).transpose(1, 2);          // (B, H+2Hkv, T, hd)
    Tensor qk = qkv.slice(1, 0, H_ + Hkv_), v = qkv.slice(1, H_ + Hkv_);
    if (rope_applies(qk, cos)) {
      qk = rope(qk, *cos, *sin);
    } else if (cos) {
      qk = at::addcmul(qk * *cos, at::matmul(qk, *rotate_), *sin);
    }
    Tensor q = qk.slice(1, 0, H_), k = qk.slice(1, H_);

    kv.k[index].narrow(2, pos, T).copy_(k);  // KVCache.write
    kv.v[index].narrow(2, pos, T).copy_(v);
    const int64_t window = lw.window;
    const int64_t key_start = window < 0 ? 0 : std::max<int64_t>(0, pos - window + 1);
    Tensor keys = kv.k[index].narrow(2, key_start, pos + T - key_start);  // (B, Hkv, S, hd)
    Tensor values = kv.v[index].narrow(2, key_start, pos + T - key_start);
    OptTensor rows = B == 1 ? attention_rows(q, keys, values, pos, key_start, window, lw.scale) : std::nullopt;
    Tensor attn = rows ? *rows : sdpa(q, keys, values, B, T, pos, key_start, window, lw.scale, masks);  // (B*T, H*hd)
    h = project(attn, lw.o_t, lw.o_b, &h, lw.o_p);

    x = norm(h, lw.mlp_norm_w, lw.mlp_norm_b);
    Tensor inner;
    if (lw.gate_up_t) {
      Tensor gate_up = project(x, *lw.gate_up_t, lw.gate_up_b, nullptr, lw.gate_up_p);  // (B*T, 2*ff): gate then up
      OptTensor fused = activation_ == "silu" ? silu_mul_rows(gate_up) : std::nullopt;
      const int64_t ff = gate_up.size(-1) / 2;
      inner = fused ? *fused : act(gate_up.slice(1, 0, ff)) * gate_up.slice(1, ff);
    } else if (lw.gate_t) {
      inner = act(project(x, *lw.gate_t, lw.gate_b, nullptr, lw.gate_p)) *
              project(x, *lw.up_t, lw.up_b, nullptr, lw.up_p);
    } else {
      inner = act(project(x, *lw.up_t, lw.up_b, nullptr, lw.up_p));
    }
    return project(inner, lw.down_t, lw.down_b, &h, lw.down_p).view({B, T, d});
  }

  std::vector<NativeLayer> layers_;
  Tensor embed_;
  OptTensor pos_embed_;
  Tensor final_norm_w_;
  OptTensor final_norm_b_;
  OptTensor cos_, sin_, rotate_;
  Tensor inv_width_, norm_eps_;
  double eps_;
  std::string norm_kind_, activation_;
  int64_t H_, Hkv_, hd_;
};

// An NgramStore's arrays (datastore.py) as draft_round.h's table; the tensors must outlive it.
static draft::NgramTable ngram_table(const Tensor& keys, const Tensor& next, const Tensor& share, int64_t vocab,
                                     double min_share) {
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong && keys.is_contiguous(), "keys: 1-d int64");
  TORCH_CHECK(next.dim() == 1 && next.scalar_type() == at::kInt && next.is_contiguous(), "next: 1-d int32");
  TORCH_CHECK(share.dim() == 1 && share.scalar_type() == at::kFloat && share.is_contiguous(), "share: 1-d float32");
  TORCH_CHECK(keys.numel() == next.numel() && keys.numel() == share.numel(), "keys, next, share: one length");
  return {keys.data_ptr<int64_t>(), next.data_ptr<int32_t>(), share.data_ptr<float>(), keys.numel(), vocab, min_share};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("SMALL_ROWS") = panel::SMALL_ROWS;
  // RoPE in one pass, or None where it does not serve (see rope_applies): the Python layer's choice
  m.def("rope", [](const Tensor& qk, const Tensor& cos, const Tensor& sin) -> OptTensor {
    if (!rope_applies(qk, cos)) return std::nullopt;
    return rope(qk, cos, sin);
  }, py::arg("qk"), py::arg("cos"), py::arg("sin"));
  // The row kernels, or None where they do not serve: the Python layer's choice, as with rope
  m.def("rms_norm", &rms_norm_rows, py::arg("x"), py::arg("w"), py::arg("eps"));
  m.def("attention", &attention_rows, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("pos"),
        py::arg("key_start"), py::arg("window"), py::arg("scale"));
  m.def("silu_mul", &silu_mul_rows, py::arg("gate_up"));
  m.def("greedy_verdict", &greedy_verdict_rows, py::arg("logits"), py::arg("tokens"));
  m.def("greedy_rows", &greedy_rows, py::arg("logits"));
  py::class_<PackedWeight, Packed>(m, "PackedWeight")
      .def(py::init<Tensor>(), py::arg("source"))
      .def("repack", &PackedWeight::repack, py::arg("start"), py::arg("end"))
      // x @ W[:, :columns] (+ bias) (+ residual), or None where the panels do not serve x (see serves)
      .def("mm", [](const PackedWeight& w, const Tensor& x, const OptTensor& bias, const OptTensor& residual,
                    int64_t columns) -> OptTensor {
             if (!w.serves(x)) return std::nullopt;
             py::gil_scoped_release release;
             return w.mm(x, bias, residual ? &*residual : nullptr, columns);
           },
           py::arg("x"), py::arg("bias") = py::none(), py::arg("residual") = py::none(), py::arg("columns") = -1);
  py::class_<NativeLayer>(m, "NativeLayer")
      .def(py::init([](Tensor attn_norm_w, OptTensor attn_norm_b, Tensor mlp_norm_w, OptTensor mlp_norm_b,
                       Tensor o_t, OptTensor o_b, Tensor down_t, OptTensor down_b,
                       OptTensor qkv_t, OptTensor qkv_b, OptTensor q_t, OptTensor q_b, OptTensor k_t,
                       OptTensor k_b, OptTensor v_t, OptTensor v_b, OptTensor gate_up_t, OptTensor gate_up_b,
                       OptTensor gate_t, OptTensor gate_b, OptTensor up_t, OptTensor up_b, double scale,
                       int64_t window, const std::map<std::string, Packed>& packed) {
             auto panels = [&](const char* name) -> Packed {
               auto found = packed.find(name);
               return found == packed.end() ? nullptr : found->second;
             };
             return NativeLayer{attn_norm_w, mlp_norm_w, o_t, down_t, attn_norm_b, mlp_norm_b, o_b, down_b,
                                qkv_t, qkv_b, q_t, q_b, k_t, k_b, v_t, v_b,
                                gate_up_t, gate_up_b, gate_t, gate_b, up_t, up_b,
                                panels("qkv_w"), panels("q_w"), panels("k_w"), panels("v_w"), panels("o_w"),
                                panels("gate_up_w"), panels("gate_w"), panels("up_w"), panels("down_w"),
                                scale, window};
           }),
           py::arg("attn_norm_w"), py::arg("attn_norm_b"), py::arg("mlp_norm_w"), py::arg("mlp_norm_b"),
           py::arg("o_t"), py::arg("o_b"), py::arg("down_t"), py::arg("down_b"),
           py::arg("qkv_t"), py::arg("qkv_b"), py::arg("q_t"), py::arg("q_b"), py::arg("k_t"), py::arg("k_b"),
           py::arg("v_t"), py::arg("v_b"), py::arg("gate_up_t"), py::arg("gate_up_b"), py::arg("gate_t"),
           py::arg("gate_b"), py::arg("up_t"), py::arg("up_b"), py::arg("scale"), py::arg("window"),
           py::arg("packed") = std::map<std::string, Packed>());
  py::class_<NativeKV>(m, "NativeKV").def(py::init<std::vector<Tensor>, std::vector<Tensor>>());
  py::class_<NativeModel>(m, "NativeModel")
      .def(py::init<std::vector<NativeLayer>, Tensor, OptTensor, Tensor, OptTensor, OptTensor, OptTensor,
                    OptTensor, Tensor, Tensor, double, std::string, std::string, int64_t, int64_t, int64_t>())
      // No Python object is touched inside, so other threads (the app's sessions) run meanwhile.
      .def("run_layers", &NativeModel::run_layers, py::call_guard<py::gil_scoped_release>())
      .def("draft_greedy", &NativeModel::draft_greedy, py::call_guard<py::gil_scoped_release>())
      .def("draft_round", &NativeModel::draft_round, py::call_guard<py::gil_scoped_release>());
  py::class_<draft::Rules>(m, "DraftRules")
      .def(py::init<>())
      .def_readwrite("eos", &draft::Rules::eos)
      .def_readwrite("limit", &draft::Rules::limit)
      .def_readwrite("max_draft", &draft::Rules::max_draft)
      .def_readwrite("length_cap", &draft::Rules::length_cap)
      .def_readwrite("fixed_length", &draft::Rules::fixed_length)
      .def_readwrite("full_step", &draft::Rules::full_step)
      .def_readwrite("draft_step", &draft::Rules::draft_step)
      .def_readwrite("marginal_verify", &draft::Rules::marginal_verify)
      .def_readwrite("bin_accepted", &draft::Rules::bin_accepted)
      .def_readwrite("bin_total", &draft::Rules::bin_total)
      .def_readwrite("alpha", &draft::Rules::alpha)
      .def_readwrite("guesses", &draft::Rules::guesses)
      .def_readwrite("agreed", &draft::Rules::agreed)
      .def_readwrite("compared", &draft::Rules::compared)
      .def_readwrite("prior_weight", &draft::Rules::prior_weight)
      .def_readwrite("prior", &draft::Rules::prior)
      .def_readwrite("pass_ms", &draft::Rules::pass_ms)
      .def_readwrite("max_ngram", &draft::Rules::max_ngram)
      .def_readwrite("min_ngram", &draft::Rules::min_ngram)
      // the corpus n-gram table (NgramStore's sorted int64 keys, int32 next tokens, float32 shares)
      .def("set_store", [](draft::Rules& rules, const Tensor& keys, const Tensor& next, const Tensor& share,
                           int64_t vocab, double min_share) {
        rules.store = ngram_table(keys, next, share, vocab, min_share);
        rules.store_owner = std::make_shared<std::vector<Tensor>>(std::vector<Tensor>{keys, next, share});
      }, py::arg("keys"), py::arg("next"), py::arg("share"), py::arg("vocab"), py::arg("min_share"));
  // the n-gram guess and the guess length alone, for tests against draft_guesses.py
  m.def("draft_guess", &draft::guess, py::arg("tokens"), py::arg("tail"), py::arg("max_ngram"), py::arg("min_ngram"),
        py::arg("length"));
  m.def("draft_store_propose", [](const Tensor& keys, const Tensor& next, const Tensor& share, int64_t vocab,
                                  double min_share, const std::vector<int64_t>& recent, int64_t length) {
    return ngram_table(keys, next, share, vocab, min_share).propose(recent, length);
  }, py::arg("keys"), py::arg("next"), py::arg("share"), py::arg("vocab"), py::arg("min_share"), py::arg("recent"),
        py::arg("length"));
  m.def("draft_guess_length", &draft::guess_length, py::arg("room"), py::arg("beta"), py::arg("pass_ms"));
  py::class_<DraftRound>(m, "DraftRound")
      .def_readonly("hidden", &DraftRound::hidden)
      .def_readonly("tokens", &DraftRound::tokens)
      .def_readonly("confidences", &DraftRound::confidences)
      .def_readonly("predicted", &DraftRound::predicted)
      .def_readonly("stop", &DraftRound::stop)
      .def_readonly("pass_rows", &DraftRound::pass_rows)
      .def_readonly("pass_used", &DraftRound::pass_used)
      .def_readonly("pass_ms", &DraftRound::pass_ms)
      .def_readonly("guessed", &DraftRound::guessed)
      .def_readonly("agreed", &DraftRound::agreed)
      .def_readonly("compared", &DraftRound::compared)
      .def_readonly("rest_ms", &DraftRound::rest_ms);
}
