"""The only module that knows Hugging Face internals: configs, checkpoint files and weight names.

It turns a checkpoint directory, a hub id, or an in-memory transformers model into a ``ModelSpec`` plus
``ModelWeights`` for the lean forward. Weights of an in-memory model are shared by reference; a
checkpoint's weights are read with safetensors (never pickle) and cast to the requested dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelSpec
from .errors import CheckpointError, UnsupportedModelError
from .model import LayerWeights, ModelWeights

LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SUPPORTED_ARCHITECTURES = (*LLAMA_FAMILY.values(), "GPT2LMHeadModel")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "config.json")


@dataclass
class LoadedCheckpoint:
    spec: ModelSpec
    weights: ModelWeights
    tokenizer: Any | None  # a transformers tokenizer, or None when the checkpoint ships none
    directory: Path | None  # where the files live (exit adapters are looked up next to the weights)


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{what}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _model_type(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_FAMILY or model_type == "gpt2":
        return model_type
    archs = ", ".join(getattr(config, "architectures", None) or []) or str(model_type)
    raise _unsupported(f"unsupported architecture {archs!r}")


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise _unsupported(f"unsupported activation {name!r}")
    return _ACTIVATIONS[name]


def _eos_ids(config, directory: Path | None) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if directory is not None and (directory / "generation_config.json").is_file():
        try:
            eos = json.loads((directory / "generation_config.json").read_text()).get("eos_token_id", eos)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{directory / 'generation_config.json'} is not valid JSON: {e}") from e
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def spec_from_config(config, directory: Path | None = None) -> ModelSpec:
    """ModelSpec from a transformers PretrainedConfig of a supported family."""
    model_type = _model_type(config)
    if model_type == "gpt2":
        d, heads = config.n_embd, config.n_head
        if getattr(config, "reorder_and_upcast_attn", False):
            raise _unsupported("GPT-2 with reorder_and_upcast_attn=True is not supported")
        return ModelSpec(
            family="gpt2", num_layers=config.n_layer, hidden_size=d, num_heads=heads, num_kv_heads=heads,
            head_dim=d // heads, intermediate_size=config.n_inner or 4 * d, vocab_size=config.vocab_size,
            max_positions=config.n_positions, norm_eps=config.layer_norm_epsilon, norm_kind="layer",
            mlp_kind="plain", activation=_activation(config.activation_function), positional="learned",
            eos_token_ids=_eos_ids(config, directory), architecture="GPT2LMHeadModel")

    L = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    windows: tuple[int | None, ...] = (None,) * L
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        windows = (int(config.sliding_window),) * L
    elif model_type == "qwen2" and getattr(config, "layer_types", None):
        windows = tuple(int(config.sliding_window) if t == "sliding_attention" else None for t in config.layer_types)
    return ModelSpec(
        family="llama", num_layers=L, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim, intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings, norm_eps=config.rms_norm_eps, norm_kind="rms",
        mlp_kind="gated", activation=_activation(config.hidden_act), positional="rope",
        sliding_windows=windows, eos_token_ids=_eos_ids(config, directory), architecture=LLAMA_FAMILY[model_type])


def _rope(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling, computed by transformers' own RoPE initialisers."""
    params = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = params.get("rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        raise _unsupported(f"RoPE type {rope_type!r} is not supported (static types only: {', '.join(_STATIC_ROPE_TYPES)})")
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), float(scale)


class _Weights:
    """Name lookup over a state dict that says which tensor is missing, instead of a KeyError."""

    def __init__(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None, origin: str):
        self.state, self.dtype, self.origin = state, dtype, origin

    def get(self, name: str, required: bool = True) -> torch.Tensor | None:
        t = self.state.get(name)
        if t is None:
            if required:
                raise CheckpointError(f"{self.origin}: weight {name!r} is missing")
            return None
        t = t.detach()
        return t if self.dtype is None or t.dtype == self.dtype else t.to(self.dtype)


def _llama_weights(config, state: _Weights) -> ModelWeights:
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            attn_norm_w=state.get(p + "input_layernorm.weight"), attn_norm_b=None,
            q_w=state.get(p + "self_attn.q_proj.weight"), q_b=state.get(p + "self_attn.q_proj.bias", False),
            k_w=state.get(p + "self_attn.k_proj.weight"), k_b=state.get(p + "self_attn.k_proj.bias", False),
            v_w=state.get(p + "self_attn.v_proj.weight"), v_b=state.get(p + "self_attn.v_proj.bias", False),
            o_w=state.get(p + "self_attn.o_proj.weight"), o_b=state.get(p + "self_attn.o_proj.bias", False),
            mlp_norm_w=state.get(p + "post_attention_layernorm.weight"), mlp_norm_b=None,
            gate_w=state.get(p + "mlp.gate_proj.weight"), gate_b=state.get(p + "mlp.gate_proj.bias", False),
            up_w=state.get(p + "mlp.up_proj.weight"), up_b=state.get(p + "mlp.up_proj.bias", False),
            down_w=state.get(p + "mlp.down_proj.weight"), down_b=state.get(p + "mlp.down_proj.bias", False)))
    embed = state.get("model.embed_tokens.weight")
    lm_head = state.get("lm_head.weight", required=not config.tie_word_embeddings)
    inv_freq, scale = _rope(config)
    return ModelWeights(embed=embed, layers=layers, final_norm_w=state.get("model.norm.weight"),
                        final_norm_b=None, lm_head=embed if lm_head is None else lm_head,
                        rope_inv_freq=inv_freq, rope_scale=scale)


def _gpt2_weights(config, state: _Weights) -> ModelWeights:
    d = config.n_embd
    layers = []
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        # GPT-2 uses Conv1D: weights are stored (in, out); .T gives F.linear's (out, in) as a view, no copy.
        qkv_w, qkv_b = state.get(p + "attn.c_attn.weight").T, state.get(p + "attn.c_attn.bias")  # (3d, d), (3d,)
        scale = 1.0 / (d // config.n_head) ** 0.5 if config.scale_attn_weights else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= i + 1
        layers.append(LayerWeights(
            attn_norm_w=state.get(p + "ln_1.weight"), attn_norm_b=state.get(p + "ln_1.bias"),
            q_w=qkv_w[:d], q_b=qkv_b[:d], k_w=qkv_w[d:2 * d], k_b=qkv_b[d:2 * d],
            v_w=qkv_w[2 * d:], v_b=qkv_b[2 * d:],
            o_w=state.get(p + "attn.c_proj.weight").T, o_b=state.get(p + "attn.c_proj.bias"),
            mlp_norm_w=state.get(p + "ln_2.weight"), mlp_norm_b=state.get(p + "ln_2.bias"),
            up_w=state.get(p + "mlp.c_fc.weight").T, up_b=state.get(p + "mlp.c_fc.bias"),
            gate_w=None, gate_b=None,
            down_w=state.get(p + "mlp.c_proj.weight").T, down_b=state.get(p + "mlp.c_proj.bias"),
            attn_scale=scale))
    embed = state.get("transformer.wte.weight")
    lm_head = state.get("lm_head.weight", required=False)
    return ModelWeights(embed=embed, layers=layers, final_norm_w=state.get("transformer.ln_f.weight"),
                        final_norm_b=state.get("transformer.ln_f.bias"),
                        lm_head=embed if lm_head is None or config.tie_word_embeddings else lm_head,
                        pos_embed=state.get("transformer.wpe.weight"))


def weights_from_state(config, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                       origin: str = "model") -> ModelWeights:
    if _model_type(config) == "gpt2":
        if not any(k.startswith("transformer.") for k in state):  # old GPT-2 files have no prefix
            state = {f"transformer.{k}": v for k, v in state.items()}
        return _gpt2_weights(config, _Weights(state, dtype, origin))
    return _llama_weights(config, _Weights(state, dtype, origin))


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights: model.safetensors, or its index's shards."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        return [directory / name for name in shard_names]
    raise CheckpointError(f"{directory} has no model.safetensors (only safetensors checkpoints are read, never pickle)")


def weights_hash(directory: Path) -> str:
    """First 12 hex digits of sha256 over the checkpoint's weight files (not its sidecars): names the
    training runs that belong to these weights, so a retrained model never resumes another's run."""
    h = hashlib.sha256()
    for path in weight_files(Path(directory)):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from e
    return state


def _resolve(path_or_id: str) -> Path:
    """A local directory as is; otherwise download a hub id's config, safetensors and tokenizer files."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    looks_like_hub_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_hub_id or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CheckpointError(f"model directory {path_or_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model"]))
    except Exception as e:  # network errors, missing repos: all become one readable message
        raise CheckpointError(f"could not fetch {path_or_id!r} from the hub: {e}") from e


def load_checkpoint(path_or_id: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                    load_tokenizer: bool = True) -> LoadedCheckpoint:
    directory = _resolve(path_or_id)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face checkpoint")
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / 'config.json'} is not valid JSON: {e}") from e
    if raw.get("model_type") not in (*LLAMA_FAMILY, "gpt2"):
        archs = ", ".join(raw.get("architectures") or []) or str(raw.get("model_type"))
        raise _unsupported(f"unsupported architecture {archs!r} in {directory}")
    config = _plain_llama_config(raw)
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        except Exception as e:
            raise CheckpointError(f"{directory / 'config.json'} could not be read as a transformers config: {e}") from e
    spec = spec_from_config(config, directory)
    weights = weights_from_state(config, _read_safetensors(directory), dtype, origin=str(directory))
    tokenizer = load_tokenizer_from(directory, trust_remote_code) if load_tokenizer else None
    return LoadedCheckpoint(spec=spec, weights=weights, tokenizer=tokenizer, directory=directory)


# Importing transformers takes seconds (it indexes its whole package), more than everything else a
# load does. A plain Llama checkpoint whose config.json states every field the lean model reads — such
# as the bundled model, which our exporter writes — needs none of its code, so it is read directly;
# anything else (other families, biases, RoPE scaling, missing fields left to defaults) goes through
# AutoConfig. Tests pin the two paths to the same ModelSpec and weights.
_PLAIN_LLAMA_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                     "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias")


def _plain_llama_config(raw: dict):
    from types import SimpleNamespace

    if raw.get("model_type") != "llama" or any(k not in raw for k in _PLAIN_LLAMA_KEYS):
        return None
    rope = raw["rope_parameters"]
    if raw["attention_bias"] or raw["mlp_bias"] or raw.get("pretraining_tp", 1) != 1 or not isinstance(rope, dict) \
            or rope.get("rope_type") != "default" or not isinstance(rope.get("rope_theta"), (int, float)):
        return None
    return SimpleNamespace(**raw)


class PlainTokenizer:
    """A ``tokenizers`` tokenizer with the three methods the runtime uses, for checkpoints whose
    tokenizer_config.json asks for nothing beyond tokenizer.json (a PreTrainedTokenizerFast without
    clean-up of tokenization spaces): same ids and text as transformers' wrapper, without its import."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    @property
    def backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` itself (the attribute transformers' fast tokenizers expose)."""
        return self._tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size()


def _plain_tokenizer(directory: Path) -> PlainTokenizer | None:
    cfg_path = directory / "tokenizer_config.json"
    if not (directory / "tokenizer.json").is_file() or not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if cfg.get("tokenizer_class") != "PreTrainedTokenizerFast" or cfg.get("clean_up_tokenization_spaces", True) \
            or cfg.get("add_prefix_space") or any(k in cfg for k in ("added_tokens_decoder", "chat_template")):
        return None
    from tokenizers import Tokenizer

    try:
        return PlainTokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")))
    except Exception as e:  # a broken tokenizer.json: the message of the library that reads it
        raise CheckpointError(f"{directory / 'tokenizer.json'} could not be loaded: {e}") from e


def load_tokenizer_from(directory: Path, trust_remote_code: bool = False):
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    plain = _plain_tokenizer(directory)
    if plain is not None:
        return plain
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"tokenizer files in {directory} could not be loaded: {e}") from e


def from_hf_model(model, tokenizer=None) -> LoadedCheckpoint:
    """Wrap an in-memory transformers model; tensors are shared with it, not copied."""
    config = model.config
    spec = spec_from_config(config)
    state = dict(model.state_dict(keep_vars=False))
    weights = weights_from_state(config, state, dtype=None, origin=type(model).__name__)
    return LoadedCheckpoint(spec=spec, weights=weights, tokenizer=tokenizer, directory=None)
