"""Exit adapters (file format, identity) and the confidence measures."""

import math

import pytest
import torch

from adaptive import CheckpointError, Runtime
from adaptive.exits import ADAPTER_FILE, HiddenCosine, Margin, MaxProb, Entropy, Patience, load_adapters, save_adapters

from conftest import make_model, random_prompt


def test_zero_adapters_equal_the_logit_lens(tmp_path):
    hf = make_model("llama")
    hf.save_pretrained(tmp_path)
    plain = Runtime.from_pretrained(tmp_path)
    d, L = plain.spec.hidden_size, plain.spec.num_layers
    save_adapters(tmp_path / ADAPTER_FILE, {k: (torch.zeros(d, d), torch.zeros(d)) for k in range(1, L)}, d, L)
    adapted = Runtime.from_pretrained(tmp_path)
    assert adapted.heads.source.startswith("adapters")
    kw = dict(max_new_tokens=10, mode="early_exit", threshold=0.03)
    a, b = plain.generate(random_prompt(5), **kw), adapted.generate(random_prompt(5), **kw)
    assert a.token_ids == b.token_ids
    assert b.stats["compute_fraction"] > a.stats["compute_fraction"]  # the adapters' matmuls are charged


def test_adapters_change_the_exit_logits(tmp_path):
    hf = make_model("llama")
    hf.save_pretrained(tmp_path)
    d, L = 64, 4
    g = torch.Generator().manual_seed(0)
    save_adapters(tmp_path / ADAPTER_FILE, {1: (torch.randn(d, d, generator=g), torch.randn(d, generator=g))}, d, L)
    rt = Runtime.from_pretrained(tmp_path)
    h = torch.randn(1, 1, d)
    assert not torch.allclose(rt.heads.logits(h, 1), rt.model.head(h))
    assert torch.equal(rt.heads.logits(h, 2), rt.model.head(h))  # no adapter at 2: logit lens


def test_bad_adapter_files(tmp_path):
    path = tmp_path / ADAPTER_FILE
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_adapters(path, 64, 4)
    save_adapters(path, {1: (torch.zeros(64, 64), torch.zeros(64))}, 64, 4)
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_adapters(path, 32, 4)
    save_adapters(path, {1: (torch.full((64, 64), float("nan")), torch.zeros(64))}, 64, 4)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_adapters(path, 64, 4)


def test_measures_on_known_distributions():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    h = torch.ones(1, 1, 4)
    assert float(MaxProb().score(logits, h, h)) == pytest.approx(0.7, abs=1e-6)
    assert float(Margin().score(logits, h, h)) == pytest.approx(0.5, abs=1e-6)
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert float(Entropy().score(logits, h, h)) == pytest.approx(1 - entropy / math.log(3), abs=1e-6)
    assert float(HiddenCosine().score(None, h, -h)) == pytest.approx(-1.0)
    p = Patience(3)
    scores = [float(p.score(x, h, h)) for x in (logits, logits, logits.flip(0), logits.flip(0), logits.flip(0))]
    assert scores == pytest.approx([1 / 3, 2 / 3, 1 / 3, 2 / 3, 1.0])


def test_measures_are_batched():
    """The same measure scores one token or a whole (N, V) batch, row by row alike."""
    g = torch.Generator().manual_seed(0)
    logits, h, prev = torch.randn(5, 11, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    for measure in (MaxProb(), Margin(), Entropy(), HiddenCosine()):
        batch = measure.score(logits, h, prev)
        rows = torch.stack([measure.score(logits[i], h[i], prev[i]) for i in range(5)])
        assert batch.shape == (5,) and torch.allclose(batch, rows, atol=1e-6)
