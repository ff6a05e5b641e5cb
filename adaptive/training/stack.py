"""Layer-by-layer forward over a Hugging Face Llama model, for training with early exits.

We iterate ``model.model.layers`` ourselves (embed -> layers -> norm -> lm_head) so that hidden
states of intermediate layers are available and layers can be dropped. Attention: with the "sdpa"
implementation and ``attention_mask=None`` the SDPA integration sets ``is_causal=True`` (no padding in
training), which ``test_stack_matches_hf`` style checks verify against ``model(ids).logits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass
class ModelShape:
    width: int
    num_layers: int = 8
    vocab_size: int = 8192
    context: int = 512
    head_dim: int = 32

    def __post_init__(self):
        if self.width % self.head_dim:
            raise ValueError("width must be a multiple of head_dim")

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def intermediate(self) -> int:
        # SwiGLU with ~8/3 expansion keeps the MLP's parameters at ~ a 4x GELU MLP; multiple of 32.
        return int(round(8 / 3 * self.width / 32)) * 32


def build_model(shape: ModelShape, eot_id: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.width, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.context, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    model.generation_config.bos_token_id = eot_id
    model.generation_config.eos_token_id = eot_id
    return model


def head(model: LlamaForCausalLM, h: torch.Tensor) -> torch.Tensor:
    """The shared exit head: final RMSNorm + (tied) lm_head. [..., D] -> [..., V]."""
    return model.lm_head(model.model.norm(h))


def forward_layers(model: LlamaForCausalLM, ids: torch.Tensor, keep: set[int] | None = None,
                   drop: set[int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """ids [B, T] -> (final hidden [B, T, D] before the norm, {l: hidden after l layers} for l in keep).

    A dropped layer is skipped for the whole batch: its residual passes through unchanged.
    """
    inner = model.model
    keep, drop = keep or set(), drop or set()
    B, T = ids.shape
    h = inner.embed_tokens(ids)                                   # [B, T, D]
    pos = torch.arange(T, device=ids.device).unsqueeze(0)         # [1, T]
    pe = inner.rotary_emb(h, position_ids=pos)                    # (cos, sin), each [1, T, head_dim]
    kept = {}
    for i, layer in enumerate(inner.layers):
        if i not in drop:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        if i + 1 in keep:
            kept[i + 1] = h
    return h, kept
