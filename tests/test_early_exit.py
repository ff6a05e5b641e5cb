"""Early exit: never-exit equals full, both KV policies keep the cache complete, honest accounting."""

import pytest
import torch

from adaptive import Runtime
from adaptive.config import EarlyExitConfig
from adaptive.costs import CostModel
from adaptive.early_exit import EarlyExitDecoder

from conftest import make_model, random_prompt

MEASURES = ["max_prob", "margin", "entropy", "cosine", "attention", "patience"]


@pytest.mark.parametrize("kv_policy", ["propagate", "defer"])
@pytest.mark.parametrize("measure", MEASURES)
def test_unreachable_threshold_equals_full(family, measure, kv_policy):
    rt = Runtime.from_model(make_model(family))
    prompt = random_prompt(6, seed=4)
    full = rt.generate(prompt, max_new_tokens=20)
    # max_prob/margin/entropy/patience of a tiny random model never reach 1.0; cosine is capped at 1 too
    ee = rt.generate(prompt, max_new_tokens=20, mode="early_exit", threshold=1.0, measure=measure,
                     kv_policy=kv_policy, patience=99)
    assert ee.token_ids == full.token_ids
    assert all(t.exit_layer == rt.spec.num_layers for t in ee.traces)


def _decoder(rt, **knobs):
    cfg = rt.early_exit_config(**knobs)
    return EarlyExitDecoder(rt.model, rt.costs, 64, rt.heads, cfg)


@torch.inference_mode()
def test_propagate_fills_every_skipped_layer_each_step(family):
    rt = Runtime.from_model(make_model(family))
    dec = _decoder(rt, threshold=0.0, min_layer=1, kv_policy="propagate")
    dec.prefill(torch.tensor([random_prompt(5)]))
    token = 3
    for _ in range(8):
        out = dec.step(token)
        assert out.exit_layer == 1 and out.kv_fill_layers == rt.spec.num_layers - 1
        assert dec.cache.fill == [dec.pos] * rt.spec.num_layers
        token = int(torch.argmax(out.logits))


@torch.inference_mode()
def test_propagated_kv_equals_layer_projection_of_exit_state():
    rt = Runtime.from_model(make_model("qwen2"))  # q/k/v biases exercise the folded bias
    model = rt.model
    dec = _decoder(rt, threshold=0.0, exit_layers=(2,), kv_policy="propagate")
    dec.prefill(torch.tensor([random_prompt(5)]))
    pos = dec.pos
    # recompute by hand: embed, two layers into a scratch cache, then each deeper layer's own norm + k_proj + rope
    scratch = model.new_cache(1, 64)
    scratch.fill = list(dec.cache.fill)
    scratch.k.copy_(dec.cache.k)
    scratch.v.copy_(dec.cache.v)
    h = model.run_layers(model.embed(torch.tensor([[7]]), pos), 0, 2, pos, scratch)
    dec.step(7)
    for layer in range(2, model.spec.num_layers):
        lw = model.w.layers[layer]
        x = model.norm(h, lw.attn_norm_w, lw.attn_norm_b)
        k = torch.nn.functional.linear(x, lw.k_w, lw.k_b).view(1, 1, model.spec.num_kv_heads, -1)  # (B, T, Hkv, hd)
        v = torch.nn.functional.linear(x, lw.v_w, lw.v_b).view(1, 1, model.spec.num_kv_heads, -1).transpose(1, 2)
        k = model._rope(k, pos).transpose(1, 2)  # (B, Hkv, T, hd)
        assert torch.allclose(dec.cache.k[layer, :, :, pos:pos + 1], k, atol=1e-5)
        assert torch.allclose(dec.cache.v[layer, :, :, pos:pos + 1], v, atol=1e-5)


@torch.inference_mode()
def test_defer_keeps_depth_monotone_and_flush_gives_exact_cache(family):
    """Deferred positions get exactly the K/V a full-depth pass over the same tokens produces."""
    rt = Runtime.from_model(make_model(family))
    model, L = rt.model, rt.spec.num_layers
    dec = _decoder(rt, threshold=0.0, exit_layers=(1, 2, 3), kv_policy="defer")
    prompt = random_prompt(6, seed=1)
    out = dec.prefill(torch.tensor([prompt]))
    tokens = []
    # alternate shallow and full-depth steps by switching the threshold: exits at 1, 2, never, ...
    schedule = [0.0, 0.0, 1.1, 0.0, 1.1, 1.1, 0.0, 0.0]
    for thr in schedule:
        dec.config = EarlyExitConfig(threshold=min(thr, 1.0), exit_layers=(1, 2, 3), kv_policy="defer", num_layers=L)
        dec.exit_points = frozenset() if thr > 1 else dec.config.exit_points(L)
        token = int(torch.argmax(out.logits))
        tokens.append(token)
        out = dec.step(token)
        fill = dec.cache.fill
        assert fill[0] == dec.pos  # every token runs layer 0
        assert all(a >= b for a, b in zip(fill, fill[1:]))  # depth never increases along the sequence
        if thr > 1:
            assert fill == [dec.pos] * L  # a full-depth token brings every earlier position up to date
    assert dec.cache.fill[-1] < dec.pos  # the last token exited early: some work is still owed
    dec.flush()
    assert dec.cache.is_complete(dec.pos)
    ref = model.new_cache(1, 64)
    model.run_layers(model.embed(torch.tensor([prompt + tokens]), 0), 0, L, 0, ref)
    n = dec.pos
    assert torch.allclose(dec.cache.k[:, :, :, :n], ref.k[:, :, :, :n], atol=1e-4)
    assert torch.allclose(dec.cache.v[:, :, :, :n], ref.v[:, :, :, :n], atol=1e-4)


def test_compute_accounting_counts_heads_and_kv_fill():
    rt = Runtime.from_model(make_model("llama"))
    c: CostModel = rt.costs
    L = rt.spec.num_layers
    res = rt.generate(random_prompt(5), max_new_tokens=6, mode="early_exit", threshold=0.0, exit_layers=(2,),
                      kv_policy="propagate")
    for t in res.traces[1:]:
        assert t.exit_layer == 2 and t.kv_fill_layers == L - 2
        pos = t.position - 1  # the position whose forward produced this token's logits
        expected = c.layers_macs(0, 2, pos) + c.head_macs + (L - 2) * c.kv_fill_macs
        assert t.macs == expected
        assert t.full_macs == c.full_token_macs(pos)
    assert res.stats["compute_fraction"] == pytest.approx(sum(t.macs for t in res.traces) / sum(t.full_macs for t in res.traces))
    assert res.stats["compute_fraction"] < 1.0


def test_checking_every_layer_costs_more_than_full_depth():
    """An LM-head check at every layer is charged: with no exit, early exit is dearer than full."""
    rt = Runtime.from_model(make_model("llama"))
    res = rt.generate(random_prompt(5), max_new_tokens=6, mode="early_exit", threshold=1.0)
    assert res.stats["compute_fraction"] > 1.0
    cos = rt.generate(random_prompt(5), max_new_tokens=6, mode="early_exit", threshold=1.0, measure="cosine")
    assert cos.stats["compute_fraction"] == pytest.approx(1.0)  # hidden-state measures need no head


def test_follow_measures_per_token_agreement_on_the_reference_prefix():
    rt = Runtime.from_model(make_model("llama"))
    prompt = random_prompt(6, seed=12)
    full = rt.generate(prompt, max_new_tokens=20).token_ids
    assert rt.generate(prompt, max_new_tokens=20, follow=full).token_ids == full  # full agrees with itself
    # defer keeps exact K/V, so a forced step sees exactly what a fresh prefill of the same prefix sees
    ee = rt.generate(prompt, max_new_tokens=20, mode="early_exit", threshold=0.02, kv_policy="defer", follow=full)
    free = rt.generate(prompt, max_new_tokens=20, mode="early_exit", threshold=0.02, kv_policy="defer")
    assert ee.traces[0].token_id == free.traces[0].token_id == full[0]
    # each forced step is the early-exit choice after the *reference* prefix: compare with a one-step run
    for i in (3, 11):
        one = rt.generate(prompt + full[:i], max_new_tokens=2, mode="early_exit", threshold=0.02,
                          kv_policy="defer").token_ids[1]
        assert ee.token_ids[i + 1] == one


def test_exit_shortlist_restricts_exits_and_is_charged_by_its_size():
    rt = Runtime.from_model(make_model("llama"))
    rt.draft_ranking = list(range(0, 97, 2))
    prompt = random_prompt(6, seed=13)
    allowed = set(range(0, 40, 2)) | set(prompt)
    res = rt.generate(prompt, max_new_tokens=15, mode="early_exit", threshold=0.0, exit_layers=(2,), exit_vocab_size=20)
    assert res.stats["exit_vocab"] == len(allowed)
    c, L = rt.costs, rt.spec.num_layers
    for t in res.traces[1:]:
        assert t.exit_layer == 2 and t.token_id in allowed
        pos = t.position - 1
        assert t.macs == c.layers_macs(0, 2, pos) + c.hidden_size * len(allowed) + (L - 2) * c.kv_fill_macs
    never = rt.generate(prompt, max_new_tokens=15, mode="early_exit", threshold=1.0, exit_vocab_size=20)
    assert never.token_ids == rt.generate(prompt, max_new_tokens=15).token_ids  # the final head is never shortlisted


def test_fixed_paths_run_exactly_their_layers():
    rt = Runtime.from_model(make_model("llama"))  # 4 layers: light = 1, standard = 2
    prompt = random_prompt(6, seed=14)
    assert rt.paths == {"light": 1, "standard": 2, "full": 4}
    full = rt.generate(prompt, max_new_tokens=10)
    assert rt.generate(prompt, max_new_tokens=10, path="full").token_ids == full.token_ids
    for name, depth in (("light", 1), ("standard", 2)):
        res = rt.generate(prompt, max_new_tokens=10, path=name)
        assert res.stats["multiscale_path"] == name and all(t.exit_layer == depth for t in res.traces[1:])
        same = rt.generate(prompt, max_new_tokens=10, mode="early_exit", threshold=0.0, measure="cosine",
                           exit_layers=(depth,))
        assert res.token_ids == same.token_ids
    from adaptive import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="unknown path"):
        rt.generate(prompt, max_new_tokens=3, path="turbo")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "smollm"])
def test_attention_gate_matches_hugging_face_attention_weights(family):
    """measure="attention" = 1 - mean head entropy / log(keys) of the current token's attention in the
    layer just run, checked against HF's own attention probabilities (eager attention)."""
    import math

    model = make_model(family)
    rt = Runtime.from_model(model, share_weights=False)
    prompt = random_prompt(9, seed=11)
    res = rt.generate(prompt, max_new_tokens=2, mode="early_exit", measure="attention", threshold=1.0,
                      min_layer=1, stop_at_eos=False)
    checked = res.traces[1].layer_confidence  # the step that fed traces[0]'s token
    assert checked
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(torch.tensor([prompt + [res.traces[0].token_id]]), output_attentions=True)
    for k, conf in checked.items():
        attn = out.attentions[k - 1][0, :, -1, :].double()  # (H, S): the fed token's attention in layer k
        entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1).mean()
        assert conf == pytest.approx(float(1 - entropy / math.log(attn.shape[-1])), abs=1e-4)



def test_vocabulary_exit_skips_the_full_head_only_when_the_shortlist_is_confident():
    """vocab_exit: a token that runs every layer reads the shortlist first. When it is confident, the
    token is the shortlist's argmax (equal to full depth's whenever that token is in the shortlist) and
    the full head's MACs are not spent; when it is not, only the head's rows outside the shortlist run,
    so the token pays one full head (check included) and is full depth's."""
    rt = Runtime.from_model(make_model("llama"))
    rt.draft_ranking = list(range(0, 97, 2))
    L, c = rt.spec.num_layers, rt.costs
    prompt = random_prompt(6, seed=13)
    allowed = set(range(0, 40, 2)) | set(prompt)
    full = rt.generate(prompt, max_new_tokens=15).token_ids
    never_shallow = dict(mode="early_exit", threshold=1.0, exit_layers=(2,), exit_vocab_size=20, follow=full)
    check = c.hidden_size * len(allowed)
    res = rt.generate(prompt, max_new_tokens=15, vocab_exit=0.0, **never_shallow)
    assert not res.traces[0].full_head_skipped  # the prefill's token
    for t, ref in zip(res.traces[1:], full[1:]):
        assert t.exit_layer == L and t.full_head_skipped and t.token_id in allowed and t.kv_fill_layers == 0
        if ref in allowed:  # same head rows, same final state: the shortlist's argmax is full depth's
            assert t.token_id == ref
        assert t.macs == c.layers_macs(0, L, t.position - 1) + 2 * check  # layer-2 check + the shortlist at L
        assert t.macs < t.full_macs
    refused = rt.generate(prompt, max_new_tokens=15, vocab_exit=1.0, **never_shallow)
    assert refused.token_ids == full
    for t in refused.traces[1:]:
        assert not t.full_head_skipped and t.macs == t.full_macs + check  # + the layer-2 check only


def test_shortlist_head_completes_the_full_heads_logits():
    """ShortlistHead.complete: shortlist logits at full depth + the rows outside = the full head's logits."""
    from adaptive.exits import ShortlistHead

    rt = Runtime.from_model(make_model("llama"))
    ids = torch.tensor([5, 1, 40, 77, 3])
    head = ShortlistHead(rt.heads, ids)
    h = torch.randn(1, 1, rt.spec.hidden_size, generator=torch.Generator().manual_seed(2))
    L = rt.spec.num_layers
    full = rt.model.head(h)[0, 0]
    completed = head.complete(h, head.logits(h, L))
    torch.testing.assert_close(completed, full, rtol=1e-5, atol=1e-5)
    assert head.macs(L, rt.spec.hidden_size, 0) + head.rest_macs(rt.spec.hidden_size) == rt.costs.head_macs


def test_a_shortlist_grows_by_the_tokens_added_and_stays_exact():
    """ShortlistHead.add: new tokens become columns (past its spare room too: the buffer is copied), known
    ones are ignored, and logits, token ids and ``complete`` match the full head on the grown shortlist."""
    from adaptive.exits import ShortlistHead

    rt = Runtime.from_model(make_model("llama"))
    L = rt.spec.num_layers
    head = ShortlistHead(rt.heads, torch.tensor([5, 1, 40]), spare=2)
    h = torch.randn(1, 1, rt.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    full = rt.model.head(h)[0, 0]
    head.complete(h, head.logits(h, L))  # caches the rows outside, which must be rebuilt after a growth
    head.add([1, 7, 7, 90])  # 1 is known, 7 twice: 7 and 90 join, filling the spare room
    head.add([40, 11, 12, 13])  # past the room: a new buffer
    assert head.ids.tolist() == [5, 1, 40, 7, 90, 11, 12, 13] and head.size == 8
    logits = head.logits(h, L)
    torch.testing.assert_close(logits, full[head.ids], rtol=1e-5, atol=1e-5)
    assert head.token(int(logits.argmax())) == int(head.ids[full[head.ids].argmax()]) and head.token(4) == 90
    torch.testing.assert_close(head.complete(h, logits), full, rtol=1e-5, atol=1e-5)
    everything = ShortlistHead(rt.heads, None)
    everything.add([3])  # a full-vocabulary head has every token already
    assert everything.size == rt.spec.vocab_size


@pytest.mark.parametrize("knobs", [dict(exit_vocab_size=0), dict(exit_vocab_size=20, measure="cosine"),
                                   dict(exit_vocab_size=20, vocab_exit=1.5)])
def test_vocabulary_exit_needs_a_shortlist_a_logit_measure_and_a_threshold_in_range(knobs):
    from adaptive.errors import InvalidRequestError

    rt = Runtime.from_model(make_model("llama"))
    rt.draft_ranking = list(range(0, 97, 2))
    with pytest.raises(InvalidRequestError, match="vocab_exit"):
        rt.generate(random_prompt(6), max_new_tokens=3, mode="early_exit", threshold=0.5,
                    **{"vocab_exit": 0.5, **knobs})


def test_a_default_vocabulary_exit_gives_way_to_a_request_that_cannot_use_it():
    rt = Runtime.from_model(make_model("llama"))
    rt.draft_ranking = list(range(0, 97, 2))
    rt.defaults = {"early_exit": {"measure": "margin", "exit_vocab_size": 20, "vocab_exit": 0.5, "threshold": 0.9}}
    assert rt.early_exit_config().vocab_exit == 0.5
    assert rt.early_exit_config(measure="cosine").vocab_exit is None
    res = rt.generate(random_prompt(6), max_new_tokens=3, mode="early_exit", measure="cosine")
    assert res.stats["vocab_exit"] is None and res.stats["vocab_exits"] == 0
    taken = rt.generate(random_prompt(6), max_new_tokens=6, mode="early_exit", threshold=1.0, vocab_exit=0.0)
    assert taken.stats["vocab_exits"] == 5  # every decode step (the first token is the prefill's)


def test_threshold_offsets_move_single_exit_points_and_are_checked():
    """Exit point k uses threshold + offset_k: an offset of +1 shuts one exit point (confidence <= 1 < 1.5),
    -1 opens it for every token; the default's offsets come from JSON with string keys; offsets of
    layers that are not exit points are ignored, out-of-range ones are refused."""
    from adaptive.errors import InvalidRequestError

    rt = Runtime.from_model(make_model("llama"))
    prompt = random_prompt(6, seed=21)
    both = dict(mode="early_exit", measure="max_prob", exit_layers=(1, 2), max_new_tokens=10)
    shut = rt.generate(prompt, threshold=0.5, threshold_offsets={1: 1.0}, **both)
    assert all(t.exit_layer != 1 for t in shut.traces[1:])
    assert shut.stats["threshold_offsets"] == {"1": 1.0}
    opened = rt.generate(prompt, threshold=1.0, threshold_offsets={"2": -1.0}, **both)
    assert all(t.exit_layer == 2 for t in opened.traces[1:] if t.exit_layer != 1)
    assert any(t.exit_layer == 2 for t in opened.traces[1:])
    rt.defaults = {"early_exit": {"threshold": 1.0, "threshold_offsets": {"2": -1.0}}}
    assert rt.generate(prompt, **both).token_ids == opened.token_ids  # inherited from the defaults
    assert rt.early_exit_config(exit_layers=(1, 3)).threshold_at(2) == 0.0  # kept, but 2 is no exit point
    for bad in ({0: 0.1}, {rt.spec.num_layers: 0.1}, {1: 1.5}, {1: "x"}, {"one": 0.1}):
        with pytest.raises(InvalidRequestError, match="threshold_offsets"):
            rt.early_exit_config(threshold_offsets=bad)


def test_the_vocabulary_exit_can_read_a_shortlist_of_its_own():
    """vocab_exit_size: the vocabulary exit reads its own (bigger) shortlist while exit checks keep theirs;
    every token it emits lies in that list, and its check is charged at that list's size."""
    from adaptive import InvalidRequestError

    rt = Runtime.from_model(make_model("llama"))
    V, d = rt.spec.vocab_size, rt.spec.hidden_size
    rt.draft_ranking = list(range(V))  # shortlist of size n: ids 0..n-1 plus the prompt's tokens
    prompt = [90, 91, 92]
    knobs = dict(mode="early_exit", threshold=1.0, exit_layers=(2,), exit_vocab_size=4, vocab_exit=0.0,
                 max_new_tokens=12)  # no early exit; every later token takes the vocabulary exit
    small = rt.generate(prompt, **knobs)
    big = rt.generate(prompt, **knobs, vocab_exit_size=40)
    assert big.stats["vocab_exit_size"] == 40 and small.stats["vocab_exit_size"] == 0
    assert all(t.full_head_skipped for t in big.traces[1:]) and all(t.full_head_skipped for t in small.traces[1:])
    assert set(small.token_ids[1:]) <= set(range(4)) | set(prompt)
    assert set(big.token_ids[1:]) <= set(range(40)) | set(prompt)
    assert set(big.token_ids[1:]) - set(range(4)) - set(prompt)  # it used the bigger list
    # the vocabulary exit's check costs its own list's rows: 40 + 3 prompt tokens vs 4 + 3
    extra = [b.macs - s.macs for s, b in zip(small.traces[1:], big.traces[1:])]
    assert set(extra) == {(43 - 7) * d}
    # a vocabulary exit needs some shortlist: its own is enough
    assert rt.generate(prompt, **{**knobs, "exit_vocab_size": 0}, vocab_exit_size=40).stats["vocab_exit_size"] == 40
    with pytest.raises(InvalidRequestError, match="vocab_exit_size must be an integer >= 0"):
        rt.generate(prompt, **knobs, vocab_exit_size=-1)


def test_exit_adapters_off_reads_the_logit_lens_and_pays_no_adapter():
    """exit_adapters=False decodes exactly like the same model without adapters, and says so in its stats;
    a value that is not a boolean is refused."""
    from adaptive.errors import InvalidRequestError
    from adaptive.exits import ExitHeads

    plain = Runtime.from_model(make_model("llama"))
    adapted = Runtime.from_model(make_model("llama"))
    d, L = adapted.spec.hidden_size, adapted.spec.num_layers
    g = torch.Generator().manual_seed(1)
    adapted.heads = ExitHeads(adapted.model, {k: (0.5 * torch.randn(d, d, generator=g), torch.zeros(d)) for k in range(1, L)})
    prompt = random_prompt(8, seed=3)
    knobs = dict(mode="early_exit", threshold=0.05, max_new_tokens=12)
    lens = adapted.generate(prompt, exit_adapters=False, **knobs)
    ref = plain.generate(prompt, **knobs)
    assert lens.token_ids == ref.token_ids and lens.stats["macs"] == ref.stats["macs"]
    assert lens.stats["exit_heads"] == "logit lens" and lens.stats["exit_adapters"] is False
    on = adapted.generate(prompt, **knobs)
    assert on.stats["exit_adapters"] is True and on.stats["macs"] != lens.stats["macs"]
    with pytest.raises(InvalidRequestError, match="exit_adapters"):
        adapted.generate(prompt, exit_adapters="no", **knobs)


def test_layer_span_costs_are_the_sum_of_their_layers():
    # the closed form (no sliding windows) and the per-layer sum (windows) must charge the same MACs
    plain = CostModel(layer_weight_macs=1000, attention_macs_per_key=7, head_macs=5, kv_fill_macs=3,
                      adapter_macs=2, num_layers=4, sliding_windows=(None,) * 4)
    windowed = CostModel(layer_weight_macs=1000, attention_macs_per_key=7, head_macs=5, kv_fill_macs=3,
                         adapter_macs=2, num_layers=4, sliding_windows=(None, 4, None, 4))
    for c in (plain, windowed):
        for start, end, pos in ((0, 4, 0), (1, 3, 9), (2, 2, 5), (0, 4, 100)):
            assert c.layers_macs(start, end, pos) == sum(c.layer_macs(i, pos) for i in range(start, end))
    assert plain.layers_macs(0, 4, 9) == 4 * (1000 + 7 * 10)
    for c in (plain, windowed):  # spans of positions: a draft pass of several rows, a verification, a prompt
        for start, end, first, count in ((0, 4, 0, 1), (1, 3, 9, 5), (2, 2, 5, 3), (0, 4, 100, 8), (0, 4, 7, 0)):
            assert c.positions_macs(start, end, first, count) == sum(c.layers_macs(start, end, p)
                                                                     for p in range(first, first + count))
    assert windowed.layers_macs(0, 4, 9) == 2 * (1000 + 7 * 10) + 2 * (1000 + 7 * 4)
