"""The training stack: layer-by-layer forward equals Hugging Face, and training under the propagate
KV policy sees exactly the K/V the runtime's propagate decoder writes."""

import pytest
import torch

from adaptive import Runtime
from adaptive.early_exit import EarlyExitDecoder
from adaptive.training.stack import (PropagatePlan, forward_layers, forward_layers_propagate, head,
                                     layer_with_kv_source)

from conftest import make_model, random_prompt


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor([random_prompt(n, seed=seed)])


@torch.no_grad()
def test_layer_by_layer_forward_matches_hugging_face():
    model = make_model("smollm")  # GQA: the K/V-source layer must handle grouped heads
    ids = _ids(12)
    h, _ = forward_layers(model, ids)
    assert torch.allclose(head(model, h), model(ids).logits, atol=1e-5)


@torch.no_grad()
def test_a_layer_reading_its_own_state_as_kv_source_is_the_plain_layer():
    model = make_model("smollm")
    inner = model.model
    ids = _ids(9)
    h = inner.embed_tokens(ids)
    pos = torch.arange(9).unsqueeze(0)
    pe = inner.rotary_emb(h, position_ids=pos)
    layer = inner.layers[0]
    plain = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
    assert torch.allclose(layer_with_kv_source(layer, h, h.clone(), pe), plain, atol=1e-5)


@torch.no_grad()
def test_no_confident_position_means_the_plain_forward():
    model = make_model("llama")
    ids = _ids(10)
    plain, _ = forward_layers(model, ids)
    h, _, stats, exit_layer = forward_layers_propagate(model, ids, PropagatePlan((2,), threshold=0.999999))
    assert torch.equal(exit_layer, torch.full_like(exit_layer, 4)) and stats.exited == {2: 0.0}
    assert torch.allclose(h, plain, atol=1e-6)


@torch.inference_mode()
def test_training_sees_the_kv_the_runtime_propagates():
    # Runtime: a 6-token prompt at full depth, then 4 tokens that all exit after layer 2 (their K/V of
    # layers 2-3 filled from the exit state), then one token at full depth.
    model = make_model("llama")
    rt = Runtime.from_model(model)
    lean = rt.model
    ids = _ids(11, seed=3)
    dec = EarlyExitDecoder(lean, rt.costs, 64, rt.heads,
                           rt.early_exit_config(threshold=0.0, exit_layers=(2,), kv_policy="propagate"))
    dec.prefill(ids[:, :6])
    for t in ids[0, 6:10].tolist():
        assert dec.step(t).exit_layer == 2
    pos = dec.pos
    h = lean.run_layers(lean.embed(ids[:, 10:], pos), 0, 4, pos, dec.cache)
    runtime_logits = lean.head(h)[0, -1]

    # Training stack: the same exits, forced; position 10 reads propagated K/V of positions 6-9.
    inner = model.model
    x = inner.embed_tokens(ids)
    pe = inner.rotary_emb(x, position_ids=torch.arange(11).unsqueeze(0))
    exited = torch.zeros(1, 11, 1, dtype=torch.bool)
    exited[:, 6:10] = True
    source = None
    for i, layer in enumerate(inner.layers):
        if i == 2:
            source = x
        x = layer_with_kv_source(layer, x, x if source is None else torch.where(exited, source, x), pe)
    assert torch.allclose(head(model, x)[0, -1], runtime_logits, atol=1e-4)

    # ...and the approximation matters: exact K/V give different logits.
    exact, _ = forward_layers(model, ids)
    assert not torch.allclose(head(model, exact)[0, -1], runtime_logits, atol=1e-3)


def test_propagate_diagnostic_without_exits_agrees_fully_and_runs_every_layer():
    import numpy as np
    from types import SimpleNamespace
    from adaptive.training.train_model import propagate_agreement
    model = make_model("llama")
    split = SimpleNamespace(tokens=np.array(random_prompt(80, seed=5), dtype=np.int64))
    out = propagate_agreement(model, split, seq_len=16, n_windows=4, plan=PropagatePlan((2,), 0.999999))
    assert out["agreement"] == 1.0 and out["layers_frac"] == 1.0
    # everything exits after layer 2: half the layers, and the shallow predictions now differ somewhere
    out = propagate_agreement(model, split, seq_len=16, n_windows=4, plan=PropagatePlan((2,), 1e-9))
    assert out["layers_frac"] == 0.5 and out["agreement"] < 1.0


@pytest.mark.parametrize("flag, value", [("--propagate-exits", "0,4"), ("--propagate-exits", "four"),
                                         ("--propagate-threshold", "0.9:0.5"),
                                         ("--propagate-threshold", "0.5")])
def test_bad_propagate_flags_are_refused_with_a_message(flag, value, capsys):
    import argparse
    from adaptive.training.train_model import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args([flag, value])
    assert flag in capsys.readouterr().err
