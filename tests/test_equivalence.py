"""Our lean forward against Hugging Face's, on tiny random models of every supported family."""

import torch

from adaptive import Runtime
from adaptive.loading import from_hf_model
from adaptive.model import LeanModel

from conftest import make_model, random_prompt


def _lean(hf):
    loaded = from_hf_model(hf)
    return LeanModel(loaded.spec, loaded.weights)


@torch.inference_mode()
def test_prefill_and_incremental_logits_match_hf(family):
    hf = make_model(family)
    model = _lean(hf)
    ids = torch.tensor([random_prompt(20)])
    ref = hf(ids).logits[0]  # (T, V)
    L = model.spec.num_layers
    cache = model.new_cache(1, 64)
    ours = [model.head(model.run_layers(model.embed(ids[:, :12], 0), 0, L, 0, cache))[0]]
    for t in range(12, 20):  # one token at a time through the cache
        ours.append(model.head(model.run_layers(model.embed(ids[:, t:t + 1], t), 0, L, t, cache))[0])
    ours = torch.cat(ours)
    assert (ours - ref).abs().max().item() < 1e-4


@torch.inference_mode()
def test_chunked_prefill_matches_hf(family):
    """Several positions at once on top of a filled cache (the path verification and defer use)."""
    hf = make_model(family)
    model = _lean(hf)
    ids = torch.tensor([random_prompt(24, seed=3)])
    ref = hf(ids).logits[0]
    L = model.spec.num_layers
    cache = model.new_cache(1, 64)
    a = model.head(model.run_layers(model.embed(ids[:, :10], 0), 0, L, 0, cache))[0]
    b = model.head(model.run_layers(model.embed(ids[:, 10:], 10), 0, L, 10, cache))[0]
    assert (torch.cat([a, b]) - ref).abs().max().item() < 1e-4


def test_full_mode_greedy_equals_hf_generate(family):
    hf = make_model(family)
    rt = Runtime.from_model(hf)
    for seed, length in ((0, 5), (1, 17)):
        prompt = random_prompt(length, seed)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, length:].tolist()
        assert rt.generate(prompt, max_new_tokens=40).token_ids == ref


def test_weights_are_shared_with_the_hf_model(llama):
    rt = Runtime.from_model(llama)
    assert rt.model.w.embed.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    assert rt.model.w.layers[0].q_w.data_ptr() == llama.model.layers[0].self_attn.q_proj.weight.data_ptr()


def test_saved_checkpoint_loads_and_matches(tmp_path, family):
    hf = make_model(family)
    hf.save_pretrained(tmp_path)
    rt = Runtime.from_pretrained(tmp_path)
    prompt = random_prompt(9, seed=5)
    assert rt.generate(prompt, max_new_tokens=12).token_ids == Runtime.from_model(hf).generate(prompt, max_new_tokens=12).token_ids


def test_fused_and_shared_layouts_agree(family):
    hf = make_model(family)
    prompt = random_prompt(8, seed=6)
    shared = Runtime.from_model(hf).generate(prompt, max_new_tokens=20, mode="early_exit", threshold=0.05)
    fused = Runtime.from_model(hf, share_weights=False).generate(prompt, max_new_tokens=20, mode="early_exit", threshold=0.05)
    assert shared.token_ids == fused.token_ids
    assert [t.exit_layer for t in shared.traces] == [t.exit_layer for t in fused.traces]


def test_plain_config_path_only_for_fully_stated_plain_llama(tmp_path):
    """config.json is read without transformers only for a plain Llama that states every field; a saved
    tiny checkpoint loads to the same spec and logits either way."""
    import json

    from transformers import AutoConfig

    from adaptive.loading import _plain_llama_config, load_checkpoint, spec_from_config

    model = make_model("llama")
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert _plain_llama_config(raw) is not None
    loaded = load_checkpoint(str(tmp_path), load_tokenizer=False)
    assert loaded.spec == spec_from_config(AutoConfig.from_pretrained(str(tmp_path)), tmp_path)
    for change in ({"model_type": "qwen2"}, {"attention_bias": True},
                   {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}):
        assert _plain_llama_config({**raw, **change}) is None
    assert _plain_llama_config({k: v for k, v in raw.items() if k != "rms_norm_eps"}) is None
    rt = Runtime.from_pretrained(str(tmp_path))
    ids = torch.tensor([random_prompt(10)])
    with torch.no_grad():
        ref = model(ids).logits[0, -1]
    res = rt.generate(ids[0].tolist(), max_new_tokens=1, mode="full")
    assert res.token_ids[0] == int(ref.argmax())
