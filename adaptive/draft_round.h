// The greedy self-drafter's rules between its passes, in C++ (included by native_layers.cpp, which runs
// a whole drafted round with them: NativeModel::draft_round).
//
// Why: a drafted round makes ~2-3 passes, and between two passes the Python drafter (speculative.py,
// SelfDrafter._draft_greedy) chose a guess, read the acceptance predictor and the stop rule per drafted
// token, sliced hidden states and kept its logs: 100-220 us a round inside the decode loop on one AMD
// EPYC host, 5-10% of a speculative request's time (the interpreter's data leaves the caches while a
// pass streams the weights, so the same Python costs several times what it costs in a tight loop).
//
// Each function here is the Python rule it names, operation for operation in double precision, so a
// round drafted here and one drafted by the Python loop make the same choices and the same tokens
// (tests/test_native_layers.py compares them on every field). The Python stays the reference and
// serves wherever this does not (no compiler, sampling, a block drafted ahead of a verification).

#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace draft {

// ContextNgrams.guess (draft_guesses.py): up to `length` committed tokens that followed the latest
// earlier occurrence of the end of `tail` (n-grams of max_ngram..min_ngram tokens, longest first), by
// latest_continuation's rule: the latest occurrence with `length` tokens after it, else the one with the
// longest continuation (the latest among equals). The Python keeps an index of every n-gram; here the
// committed tokens (a few hundred) are scanned from the end, which visits occurrences in the same order.
inline std::vector<int64_t> guess(const std::vector<int64_t>& tokens, const std::vector<int64_t>& tail,
                                  int64_t max_ngram, int64_t min_ngram, int64_t length) {
  if (length <= 0) return {};
  const int64_t size = static_cast<int64_t>(tokens.size());
  const int64_t tail_size = static_cast<int64_t>(tail.size());
  for (int64_t n = std::min(max_ngram, tail_size); n >= min_ngram; --n) {
    const int64_t* gram = tail.data() + tail_size - n;
    int64_t best_start = -1, best_length = 0;
    for (int64_t end = size; end >= n; --end) {  // occurrences tokens[end - n, end), latest first
      if (!std::equal(gram, gram + n, tokens.data() + end - n)) continue;
      const int64_t follow = std::min(length, size - end);
      if (follow == length) return {tokens.begin() + end, tokens.begin() + end + length};
      if (follow > best_length) best_start = end, best_length = follow;
    }
    if (best_length > 0) return {tokens.begin() + best_start, tokens.begin() + best_start + best_length};
  }
  return {};
}

// NgramStore.propose (datastore.py): up to `length` tokens chained from the corpus 3-gram table, starting
// from the last three of `recent`; each step looks the latest three tokens up (keys sorted, key =
// (t1 * vocab + t2) * vocab + t3) and stops at a missing key or a share below min_share.
struct NgramTable {
  const int64_t* keys = nullptr;
  const int32_t* next = nullptr;
  const float* share = nullptr;
  int64_t size = 0, vocab = 0;
  double min_share = 0.5;

  std::vector<int64_t> propose(const std::vector<int64_t>& recent, int64_t length) const {
    std::vector<int64_t> out;
    if (keys == nullptr || static_cast<int64_t>(recent.size()) < 3 || length <= 0) return out;
    int64_t t1 = recent[recent.size() - 3], t2 = recent[recent.size() - 2], t3 = recent.back();
    for (int64_t i = 0; i < length; ++i) {
      const int64_t key = (t1 * vocab + t2) * vocab + t3;
      const int64_t* found = std::lower_bound(keys, keys + size, key);
      if (found == keys + size || *found != key) break;
      const int64_t index = found - keys;
      if (static_cast<double>(share[index]) < min_share) break;
      out.push_back(next[index]);
      t1 = t2, t2 = t3, t3 = next[index];
    }
    return out;
  }
};

// GuessLength.choose: the guess length in [0, room] with the most expected drafts per predicted ms, for
// guessed tokens each agreeing with probability beta; pass_ms[r - 1]: a pass of r rows (>= room + 1 of them).
inline int64_t guess_length(int64_t room, double beta, const std::vector<double>& pass_ms) {
  if (room <= 0) return 0;
  double best_rate = 1.0 / pass_ms[0], expected = 1.0, p = 1.0;
  int64_t best = 0;
  for (int64_t g = 1; g <= room; ++g) {
    p *= beta;
    expected += p;
    const double rate = expected / pass_ms[g];
    if (rate > best_rate) best_rate = rate, best = g;
  }
  return best;
}

// What the rules read, fixed for the round (speculative.py fills it from the controller and the stats).
struct Rules {
  // the stop rule (SpeculativeDecoder's DraftLog.stop_reason and SpeculationController.draft_stop)
  std::vector<int64_t> eos;
  int64_t limit = 0;       // drafts the request and the cache allow
  int64_t max_draft = 0;   // the controller's length limit
  int64_t length_cap = 0;  // stop with "length_cap" from this many drafts
  bool fixed_length = false;                 // a fixed length: no cap, no cost rule
  double full_step = 0.0, draft_step = 0.0;  // DraftCosts
  std::vector<double> marginal_verify;       // [n]: one more verified position after n drafts
  // the acceptance predictor (AcceptanceStats.predict) per confidence bin, and the path's rate
  std::vector<int64_t> bin_accepted, bin_total;
  double alpha = 0.0;
  // the guess length (GuessLength) and the n-gram guess (ContextNgrams)
  bool guesses = false;
  int64_t agreed = 0, compared = 0;  // this path's guessed tokens agreed with / compared so far
  int64_t prior_weight = 0;
  double prior = 0.0;
  std::vector<double> pass_ms;  // [r - 1]: a pass of r rows
  int64_t max_ngram = 3, min_ngram = 1;
  // corpus n-grams, guessed from where the context has no match (SpeculativeDecoder.guess); empty: none.
  // `store_owner` keeps the arrays `store` points into alive (native_layers.cpp's set_store).
  NgramTable store;
  std::shared_ptr<const void> store_owner;

  // AcceptanceStats.predict: P(accepted) for a draft of this confidence
  double predict(double confidence) const {
    const int64_t bins = static_cast<int64_t>(bin_total.size());
    const int64_t b = std::min(static_cast<int64_t>(confidence * bins), bins - 1);
    const double prior_accept = 0.5 * (confidence + alpha);
    return (static_cast<double>(bin_accepted[b]) + 4 * prior_accept) / static_cast<double>(bin_total[b] + 4);
  }

  // GuessLength.beta: the running agreement of guessed tokens, with its prior
  double beta() const {
    return (static_cast<double>(agreed) + static_cast<double>(prior_weight) * prior) /
           static_cast<double>(compared + prior_weight);
  }

  // Why drafting stops after `drafted` tokens, the latest `token`, or "" to go on.
  std::string stop(int64_t token, int64_t drafted, double survive) const {
    if (std::find(eos.begin(), eos.end(), token) != eos.end()) return "eos";
    if (drafted >= limit || drafted >= max_draft) return "max_len";
    if (fixed_length) return "";
    if (drafted >= length_cap) return "length_cap";
    if (survive * full_step > draft_step + marginal_verify[drafted]) return "";
    return "predicted_reject";
  }
};

}  // namespace draft
