"""Bad input gets a typed error with a readable message, in Python and in the CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive import (CheckpointError, ContextLengthError, InvalidRequestError, Runtime, UnsupportedModelError)

from conftest import make_model, random_prompt

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rt():
    return Runtime.from_model(make_model("llama"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompt=""), InvalidRequestError, "empty"),
    (dict(prompt=[]), InvalidRequestError, "empty"),
    (dict(prompt=[1, 2, 10_000]), InvalidRequestError, "outside the vocabulary"),
    (dict(prompt=[1, "a"]), InvalidRequestError, "list of integers"),
    (dict(prompt=[1] * 128), ContextLengthError, "context is 128"),
    (dict(prompt=[1] * 100, max_new_tokens=50), ContextLengthError, "max_new_tokens <= 28"),
    (dict(max_new_tokens=0), InvalidRequestError, "positive integer"),
    (dict(max_new_tokens=-3), InvalidRequestError, "positive integer"),
    (dict(max_new_tokens=10**9), InvalidRequestError, "absurdly large"),
    (dict(mode="warp"), InvalidRequestError, "unknown mode"),
    (dict(mode="early_exit", measure="vibes"), InvalidRequestError, "unknown measure"),
    (dict(mode="early_exit", threshold=1.5), InvalidRequestError, "threshold must be in"),
    (dict(mode="early_exit", threshold=-0.1), InvalidRequestError, "threshold must be in"),
    (dict(mode="early_exit", kv_policy="magic"), InvalidRequestError, "unknown kv_policy"),
    (dict(mode="early_exit", min_layer=9), InvalidRequestError, "min_layer"),
    (dict(mode="early_exit", exit_layers=(0, 2)), InvalidRequestError, "exit_layers"),
    (dict(mode="full", threshold=0.5), InvalidRequestError, "unknown option"),
    (dict(temperature=-1.0), InvalidRequestError, "temperature"),
    (dict(temperature=float("nan")), InvalidRequestError, "temperature"),
    (dict(temperature=1.0, top_p=0.0), InvalidRequestError, "top_p"),
    (dict(temperature=1.0, top_k=-2), InvalidRequestError, "top_k"),
    (dict(seed=-5), InvalidRequestError, "seed"),
])
def test_bad_requests(rt, kwargs, error, message):
    kwargs = {"prompt": random_prompt(4), "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        rt.generate(**kwargs)


def test_text_prompt_without_tokenizer(rt):
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        rt.generate("def f():", max_new_tokens=3)


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        Runtime.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        Runtime.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x13\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        Runtime.from_pretrained(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Runtime.from_pretrained(broken)
    (broken / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Runtime.from_pretrained(broken)


def test_missing_weight_is_named(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, target)
    state = load_file(str(target / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_proj.weight"):
        Runtime.from_pretrained(target)


def test_a_sharded_checkpoint_loads_and_is_named_by_its_weight_files_only(tmp_path):
    """Shards listed in model.safetensors.index.json load as one checkpoint; weights_hash (which names
    training runs) covers every shard and nothing else, so writing a sidecar never orphans a run."""
    import torch
    from safetensors.torch import load_file, save_file

    from adaptive.loading import weight_files, weights_hash

    model = make_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = weight_files(tmp_path)
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    ids = torch.tensor([random_prompt(6)])
    rt = Runtime.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(ids).logits[0, -1]
        h = rt.model.run_layers(rt.model.embed(ids, 0), 0, rt.spec.num_layers, 0, rt.model.new_cache(1, 6))
        assert torch.allclose(rt.model.head(h[0, -1]), expected, atol=1e-5)
    before = weights_hash(tmp_path)
    save_file({"x": torch.zeros(3)}, str(tmp_path / "exit_adapters.safetensors"))  # a sidecar
    assert weights_hash(tmp_path) == before
    state = load_file(str(shards[-1]))
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    save_file(state, str(shards[-1]), metadata={"format": "pt"})
    assert weights_hash(tmp_path) != before
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        weights_hash(tmp_path)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM.*supported architectures: LlamaForCausalLM"):
        Runtime.from_pretrained(tmp_path)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="supported architectures"):
        Runtime.from_model(model)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "adaptive", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_cli_errors_are_one_line(tmp_path, tiny_checkpoint, capsys):
    from adaptive.__main__ import main

    for args, message in [
        (["--model", str(tiny_checkpoint), "--prompt", ""], "the prompt is empty"),
        (["--model", str(tiny_checkpoint), "--prompt", "x", "--mode", "early_exit", "--threshold", "2"], "threshold"),
        (["--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "100000"], "context"),
    ]:
        assert main(["generate", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and err.count("\n") == 1
    # and once through a real process: exit status 2, one line, no traceback
    proc = _cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_exit_layers_are_parsed_one_way_everywhere(tiny_checkpoint):
    """The CLI's generate and calibrate, the app and train-model read exit layers through one parser:
    commas and/or spaces, blank = the model's default, anything else a one-line error."""
    from adaptive.__main__ import main
    from adaptive.config import parse_exit_layers

    assert parse_exit_layers("4,6") == parse_exit_layers("4 6") == parse_exit_layers(" 4, 6 ") == (4, 6)
    assert parse_exit_layers("") is None and parse_exit_layers(None) is None and parse_exit_layers(" , ") is None
    with pytest.raises(ValueError, match="whole layer numbers"):
        parse_exit_layers("4,six")
    for command in (["generate", "--prompt", "x", "--mode", "early_exit"], ["calibrate"]):
        with pytest.raises(SystemExit, match="--exit-layers: exit layers must be whole layer numbers"):
            main([*command, "--model", str(tiny_checkpoint), "--exit-layers", "4,six"])
        with pytest.raises(SystemExit, match="--vocab-exit must be a number in \\[0, 1\\] or 'off'"):
            main([*command, "--model", str(tiny_checkpoint), "--vocab-exit", "high"])
