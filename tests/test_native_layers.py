"""The C++ layer loop (adaptive/native_layers.py): bit-identical to the Python layer, the same cache
checks, and a Python fallback that says why it runs."""

import os
import time

import pytest
import torch

from adaptive import Runtime, native_layers
from adaptive.datastore import NgramStore
from adaptive.exits import ExitHeads
from adaptive.kv_cache import CacheHoleError
from adaptive.loading import from_hf_model
from adaptive.model import LeanModel
from adaptive.speculative import SelfDrafter

from conftest import make_model, prefilled_speculative_decoder, random_prompt


@pytest.fixture(scope="module", autouse=True)
def native_built():
    """These tests compare the C++ loop with Python; without it they would compare Python with itself."""
    if native_layers.status().startswith(f"python ({native_layers.ENV_SWITCH}="):
        pytest.skip(native_layers.status())
    assert native_layers.status() == "native", native_layers.status()


def lean(family: str, fuse: bool, dtype: torch.dtype = torch.float32) -> LeanModel:
    """A tiny model with every parameter perturbed: a fresh one has unit norm weights and zero biases,
    under which a reordered product or a dropped bias would go unnoticed."""
    hf = make_model(family)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    loaded = from_hf_model(hf.to(dtype))
    return LeanModel(loaded.spec, loaded.weights, fuse=fuse)


@torch.inference_mode()
def decode_script(model: LeanModel, native: bool):
    """Every kind of pass the decoders make, in order: a prefill (causal), single-token steps, a block of
    three over a cache (mask; Mistral's window of 8 slides), the draft / verify split of one block
    across a layer boundary, a rollback, and single layers (early exit)."""
    model.use_native = native
    L = model.spec.num_layers
    cache = model.new_cache(1, 64)
    outs = []

    def run(ids, start, end, pos, h=None):
        h = model.embed(torch.tensor([ids]), pos) if h is None else h
        outs.append(model.run_layers(h, start, end, pos, cache))
        return outs[-1]

    run(random_prompt(11, seed=3), 0, L, 0)
    run([5], 0, L, 11)
    run([7], 0, L, 12)
    run([1, 2, 3], 0, L, 13)
    shallow = run([4, 9], 0, 2, 16)  # draft layers...
    run(None, 2, L, 16, h=shallow)  # ...and the verifier resuming from their hidden states
    cache.crop(17)  # rollback: position 17 is rewritten
    h = model.embed(torch.tensor([[8]]), 17)
    for layer in range(L):
        h = model.layer(layer, h, 17, cache)
        outs.append(h)
    return outs, cache


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "shared-weights"])
def test_native_layers_are_bit_identical_to_python(family, fuse):
    model = lean(family, fuse)
    python_outs, python_cache = decode_script(model, native=False)
    native_outs, native_cache = decode_script(model, native=True)
    assert model.layer_backend() == "native"
    assert len(native_outs) == len(python_outs)
    for i, (a, b) in enumerate(zip(native_outs, python_outs)):
        assert torch.equal(a, b), f"pass {i}: max difference {(a - b).abs().max().item()}"
    assert native_cache.fill == python_cache.fill
    assert torch.equal(native_cache.k, python_cache.k) and torch.equal(native_cache.v, python_cache.v)


def test_native_layers_are_bit_identical_in_bfloat16():
    """Below fp32 both paths take torch's fused RMSNorm instead of the six-call fp32 one."""
    model = lean("llama", fuse=True, dtype=torch.bfloat16)
    python_outs, _ = decode_script(model, native=False)
    native_outs, _ = decode_script(model, native=True)
    assert native_outs[0].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(native_outs, python_outs))


def test_native_greedy_equals_python_greedy_in_every_mode():
    rt = Runtime.from_model(make_model("llama"))
    prompt = random_prompt(9, seed=4)
    for mode in ("full", "early_exit", "speculative"):
        rt.model.use_native = False
        python = rt.generate(prompt, max_new_tokens=24, mode=mode)
        rt.model.use_native = True
        native = rt.generate(prompt, max_new_tokens=24, mode=mode)
        assert native.token_ids == python.token_ids, mode
        assert (native.stats["layer_code"], python.stats["layer_code"]) == (
            "native", "python (switched off for this model)")


def drafting_runtime(family: str) -> Runtime:
    """A tiny runtime with perturbed weights, random exit adapters and a draft shortlist of even ids."""
    hf = make_model(family)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    rt = Runtime.from_model(hf)
    d, L = rt.spec.hidden_size, rt.spec.num_layers
    g = torch.Generator().manual_seed(2)
    rt.heads = ExitHeads(rt.model, {k: (0.3 * torch.randn(d, d, generator=g), 0.1 * torch.randn(d, generator=g))
                                    for k in range(1, L)})
    rt.draft_ranking = list(range(0, 97, 2))
    return rt


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RoPE; learned positions added at the embedding
def test_native_greedy_draft_step_is_bit_identical(family):
    """Self-drafting over a shortlist head with exit adapters: the one-call C++ draft step drafts the same
    tokens with the same confidences as the Python step, round by round (fixed depth and length, so no
    timing enters the plan), and the verifier accepts the same prefixes."""
    rt = drafting_runtime(family)
    prompt = random_prompt(8, seed=5)
    # one-token passes: how long a guess to check follows timings (the several-row pass is tested below)
    knobs = dict(max_new_tokens=40, mode="speculative", draft_depth=2, draft_length=4, draft_vocab_size=30,
                 guess_drafts=False)
    runs = {}
    for native in (False, True):
        rt.model.use_native = native
        runs[native] = rt.generate(prompt, **knobs)
    python, native = runs[False], runs[True]
    assert native.token_ids == python.token_ids
    assert [(r.drafted, r.accepted, r.q_probs) for r in native.rounds] == \
        [(r.drafted, r.accepted, r.q_probs) for r in python.rounds]
    assert sum(len(r.drafted) for r in native.rounds) >= 20


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_native_draft_pass_over_several_rows_is_bit_identical(family):
    """A draft pass that checks a guess feeds several rows: the C++ pass returns the same hidden states,
    confidences and drafts as the Python pass, and leaves the same K/V in the draft layers."""
    rt = drafting_runtime(family)
    prompt = random_prompt(8, seed=5)
    out = {}
    for native in (False, True):
        rt.model.use_native = native
        dec, t0 = prefilled_speculative_decoder(rt, prompt, draft_depth=2, draft_vocab_size=30)
        fed, head, pos = [t0, 7, 9, 11, 7], dec.draft_head, len(prompt)
        with torch.inference_mode():
            if native:
                h, confs, drafted = dec.native_draft().draft_greedy(fed, pos, 2, dec.cache, head.heads.adapter(2),
                                                                    head.weight_t, head.ids, head.panels)
            else:
                h, confs, drafted = SelfDrafter._python_pass(dec, fed, pos, 2)
        assert dec.cache.fill[:2] == [pos + len(fed)] * 2
        out[native] = (h, confs, drafted, dec.cache.k[:2, :, :, :pos + len(fed)].clone())
    (h0, c0, t0_, k0), (h1, c1, t1, k1) = out[False], out[True]
    assert torch.equal(h0, h1) and c0 == c1 and t0_ == t1 and torch.equal(k0, k1)
    assert len(t1) == 5 and all(0 < c <= 1 for c in c1)


def test_native_path_keeps_the_cache_checks():
    model = lean("llama", fuse=True)
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        h = model.embed(torch.tensor([[1, 2]]), 0)
        with pytest.raises(CacheHoleError, match="hole"):
            model.run_layers(h, 0, 2, 1, cache)  # nothing at position 0 yet
        model.run_layers(h, 0, 4, 0, cache)
        model.run_layers(h, 0, 2, 2, cache)  # a draft: layers 0..1 now hold positions 0..3
        with pytest.raises(CacheHoleError, match="hole"):
            model.run_layers(h, 2, 4, 4, cache)  # layers 2..3 hold positions 0..1 only
        assert cache.fill == [4, 4, 2, 2]  # a refused pass writes nothing
        model.run_layers(model.embed(torch.tensor([[3] * 6]), 2), 0, 4, 2, cache)
        with pytest.raises(CacheHoleError, match="exceeds the cache length"):
            model.run_layers(model.embed(torch.tensor([[3]]), 8), 0, 4, 8, cache)
    assert cache.fill == [8, 8, 8, 8]


def test_autograd_and_padded_rows_stay_in_python(monkeypatch):
    """The C++ loop runs only where nothing records gradients: training and attribution differentiate
    through the Python layer."""
    model = lean("llama", fuse=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the C++ loop ran")

    with torch.inference_mode():  # bind the C++ loop first, then make it refuse
        model.run_layers(model.embed(torch.tensor([[1]]), 0), 0, 4, 0, model.new_cache(1, 8))
    monkeypatch.setattr(native_layers.NativeLayers, "run_layers", refuse)
    h = model.embed(torch.tensor([[1, 2]]), 0).requires_grad_()
    out = model.run_layers(h, 0, 4, 0, model.new_cache(1, 8, for_autograd=True))  # as training makes it
    out.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    with torch.inference_mode():
        pads = torch.tensor([0])
        model.run_layers(model.embed_rows(torch.tensor([[1, 2]]), 0, pads), 0, 4, 0, model.new_cache(1, 8), pads)
        with pytest.raises(AssertionError, match=r"the C\+\+ loop ran"):
            model.run_layers(model.embed(torch.tensor([[1]]), 0), 0, 4, 0, model.new_cache(1, 8))


@pytest.mark.parametrize("cause", ["switched off", "build fails"])
def test_without_the_extension_python_runs_and_says_why(monkeypatch, cause):
    monkeypatch.setattr(native_layers, "_status", None)
    monkeypatch.setattr(native_layers, "_extension", None)
    if cause == "switched off":
        monkeypatch.setenv(native_layers.ENV_SWITCH, "off")
        expected = "python (ADAPTIVE_NATIVE=off)"
    else:
        def no_compiler():
            raise RuntimeError("Error building extension 'adaptive_native_layers': g++ not found\nmore")
        monkeypatch.setattr(native_layers, "_build", no_compiler)
        expected = "python (the C++ layer loop did not build: Error building extension 'adaptive_native_layers': g++ not found)"
    rt = Runtime.from_model(make_model("llama"))
    result = rt.generate(random_prompt(6), max_new_tokens=8)
    assert native_layers.status() == expected
    assert result.stats["layer_code"] == expected
    monkeypatch.undo()  # the real extension again, for the reference
    assert Runtime.from_model(make_model("llama")).generate(random_prompt(6), max_new_tokens=8).token_ids == result.token_ids


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """torch waits forever on the lock of a build that was killed; ours clears it after 10 minutes."""
    lock = tmp_path / "lock"
    lock.write_text("")
    assert not native_layers.clear_stale_lock(tmp_path) and lock.exists()  # a build in progress
    old = time.time() - native_layers.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert native_layers.clear_stale_lock(tmp_path) and not lock.exists()
    assert not native_layers.clear_stale_lock(tmp_path)  # nothing to remove


def test_one_pass_rope_equals_the_rotation_matrix_form():
    """``rope`` (q and k rotated in one C++ pass) computes x * cos + rotate_half(x) * sin, on the strided
    (B, heads, T, hd) view the layer hands it."""
    model = lean("llama", fuse=True)
    T, hd, pos = 5, model.spec.head_dim, 7
    qkv = torch.randn(1, T, 3 * model.spec.num_heads, hd).transpose(1, 2)  # (1, 3H, T, hd), not contiguous
    qk = qkv[:, :2 * model.spec.num_heads]
    cos, sin = model.cos[pos:pos + T], model.sin[pos:pos + T]
    expected = torch.addcmul(qk * cos, torch.matmul(qk, model._rotate), sin)
    torch.testing.assert_close(native_layers.extension().rope(qk, cos, sin), expected, rtol=1e-6, atol=1e-6)


def test_native_draft_pass_refuses_a_token_outside_the_vocabulary():
    """The C++ pass copies embedding rows itself: an id past the table is an error, never a stray read."""
    rt = drafting_runtime("llama")
    rt.model.use_native = True
    dec, t0 = prefilled_speculative_decoder(rt, random_prompt(8, seed=5), draft_depth=2, draft_vocab_size=30)
    head, vocab = dec.draft_head, rt.spec.vocab_size
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside the vocabulary"):
        dec.native_draft().draft_greedy([t0, vocab], 8, 2, dec.cache, head.heads.adapter(2), head.weight_t,
                                        head.ids, head.panels)


def test_native_guess_rules_match_draft_guesses():
    """draft_round.h's n-gram guess (a scan of the committed tokens) and guess length are the Python's
    ContextNgrams.guess (an index) and GuessLength.choose, on sequences full of repeats."""
    from adaptive.draft_guesses import ContextNgrams, GuessLength

    ext = native_layers.extension()
    g = torch.Generator().manual_seed(0)
    found = 0
    for case in range(300):
        size = int(torch.randint(0, 40, (1,), generator=g))
        tokens = torch.randint(0, 4, (size,), generator=g).tolist()  # 4 ids: many earlier occurrences
        tail = torch.randint(0, 4, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        length, max_ngram, min_ngram = case % 7, 1 + case % 3, 1 + (case // 3) % 2
        if min_ngram > max_ngram:
            min_ngram = max_ngram
        expected = ContextNgrams(tokens, max_ngram=max_ngram, min_ngram=min_ngram).guess(tail, length)
        assert ext.draft_guess(tokens, tail, max_ngram, min_ngram, length) == expected, (tokens, tail, length)
        found += bool(expected) and len(expected) < length  # the longest-continuation fallback was used
    assert found > 10
    for beta in (0.0, 0.3, 0.6, 0.95):
        for costs in ([1.0 + 0.01 * r for r in range(9)], [float(r + 1) for r in range(9)], [1.0, 1.5, 1.6, 3.0] * 3):
            rule = GuessLength(lambda depth, rows: costs[rows - 1])
            rule.agreed[2], rule.compared[2] = 0, 0
            rule.PRIOR, rule.PRIOR_WEIGHT = beta, 1  # beta(2) = beta
            for room in range(0, 8):
                assert ext.draft_guess_length(room, rule.beta(2), costs) == rule.choose(2, room), (beta, costs, room)


def test_native_store_guess_matches_the_datastore():
    """draft_round.h's corpus guess (NgramTable.propose, a binary search per token) chains the same tokens
    as NgramStore.propose, stopping at the same missing key or low share."""
    ext = native_layers.extension()
    g = torch.Generator().manual_seed(3)
    corpus = torch.randint(0, 6, (400,), generator=g).numpy()  # 6 ids: 3-grams recur with mixed shares
    store = NgramStore.build(corpus, 6, min_count=2, min_share=0.3)
    chained = 0
    for case in range(300):
        recent = torch.randint(0, 6, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        length, min_share = case % 6, (0.3, 0.5, 0.7)[case % 3]
        expected = store.propose(recent, length, min_share)[0]
        assert ext.draft_store_propose(*store.tensors(), 6, min_share, recent, length) == expected, (recent, length)
        chained += len(expected) > 1
    assert chained > 10


def test_native_draft_round_matches_the_python_loop():
    """A whole greedy round in one C++ call (NativeModel::draft_round) makes the choices the Python loop
    makes between its passes: the same guesses checked, drafts, confidences, predicted acceptances, stop
    reason, passes and MACs, the same hidden states, K/V and fill levels, the same guess statistics. The
    round's costs are fixed (they come from timings) so that both read the same ones."""
    from adaptive.speculative import DraftCosts

    guessed = store_guessed = 0  # drafts that came from an agreeing guess (context / corpus), over both models
    for family in ("llama", "gpt2"):  # RoPE; learned positions added at the embedding
        rt = drafting_runtime(family)
        rt.acceptance.record(2, [0.05, 0.3, 0.55, 0.75, 0.95, 0.97], [False, True, False, True, True, True])
        base = random_prompt(8, seed=7)  # (a seed where one model's drafts agree with a guess: checked below)
        with torch.inference_mode():
            # fixed length, no guesses: these drafts do not depend on this host's timings
            dec, t0 = prefilled_speculative_decoder(rt, base, draft_depth=2, draft_vocab_size=30, draft_length=4,
                                                    guess_drafts=False)
            drafted = SelfDrafter()._draft_greedy(dec, t0, 2, 4).tokens
        prompt = base + [t0] + drafted * 3  # the drafts the path makes, repeated: guesses it may agree with
        cheap_rows = tuple(1.0 + 0.01 * r for r in range(9))
        configs = [  # (limit, guess_drafts, length_cap, fixed_length, draft_step, pass costs)
            (8, True, 8, False, 0.1, cheap_rows), (8, True, 8, False, 0.45, cheap_rows), (3, True, 8, False, 0.1, cheap_rows),
            (8, True, 2, False, 0.1, cheap_rows), (8, True, 8, True, 0.1, cheap_rows), (8, False, 8, False, 0.1, cheap_rows),
            (8, True, 8, False, 0.1, tuple(float(r + 1) for r in range(9)))]
        # corpus guesses: a datastore that knows the path's drafts, and a prompt whose context does not
        store = NgramStore.build(torch.tensor(prompt).numpy(), rt.spec.vocab_size, min_count=1)
        configs += [(8, True, 8, False, 0.1, cheap_rows, store)]
        seen = {"guessed": 0, "stops": set(), "store_guessed": 0}
        for limit, guessing, cap, fixed, step, passes, *with_store in configs:
            costs = DraftCosts(full_step=1.0, draft_step=step, marginal_verify=tuple(0.05 for _ in range(8)), pass_ms=passes)
            rt.datastore = with_store[0] if with_store else None
            out = {}
            for native in (True, False):
                with torch.inference_mode():
                    dec, t0 = prefilled_speculative_decoder(rt, base if with_store else prompt, draft_depth=2,
                                                            draft_vocab_size=30, guess_drafts=guessing)
                    dec.controller.draft_costs = lambda depth: costs
                    dec.controller.record_pass = lambda *args: None  # timings only matter from the next round on
                    dec.controller.length_cap, dec.controller.max_draft = cap, 8
                    dec.controller.fixed_length = 8 if fixed else None
                    if not native:
                        dec.native_draft = lambda: None  # the Python loop with the Python pass
                    d = SelfDrafter()._draft_greedy(dec, t0, 2, limit)
                k, pos = len(d.tokens), len(base if with_store else prompt)
                out[native] = (d, dec.cache.fill[:], dec.cache.k[:2, :, :, :pos + k].clone(),
                               dec.cache.v[:2, :, :, :pos + k].clone(), dict(dec.guesses.agreed), dict(dec.guesses.compared))
            (dn, fill_n, kn, vn, an, cn), (dp, fill_p, kp, vp, ap, cp) = out[True], out[False]
            fields = ("tokens", "confidences", "q_probs", "predicted_accept", "stop_reason", "passes", "guessed",
                      "first_rows", "rest_drafts", "macs", "depth", "drafter")
            assert [getattr(dn, f) for f in fields] == [getattr(dp, f) for f in fields], (limit, guessing, cap, fixed, step)
            assert torch.equal(dn.hidden, dp.hidden) and dn.q == dp.q
            assert fill_n == fill_p and torch.equal(kn, kp) and torch.equal(vn, vp)
            assert (an.get(2, 0), cn.get(2, 0)) == (ap.get(2, 0), cp.get(2, 0))  # guessed tokens agreed / compared
            seen["store_guessed" if with_store else "guessed"] += dn.guessed
            seen["stops"].add(dn.stop_reason)
        rt.datastore = None
        assert {"max_len", "length_cap", "predicted_reject"} <= seen["stops"], (family, seen)
        guessed += seen["guessed"]
        store_guessed += seen["store_guessed"]
    assert guessed > 0 and store_guessed > 0, (guessed, store_guessed)
