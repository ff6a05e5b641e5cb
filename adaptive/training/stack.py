"""Layer-by-layer forward over a Hugging Face Llama model, for training with early exits.

We iterate ``model.model.layers`` ourselves (embed -> layers -> norm -> lm_head) so that hidden
states of intermediate layers are available and layers can be dropped. Attention: with the "sdpa"
implementation and ``attention_mask=None`` the SDPA integration sets ``is_causal=True`` (no padding in
training), which ``test_stack_matches_hf`` style checks verify against ``model(ids).logits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


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
    h, kept, _, _ = forward_layers_propagate(model, ids, NO_EXITS, keep=keep, drop=drop)
    return h, kept


# ----------------------------------------------------------------------------- propagate in the loop
@dataclass
class PropagatePlan:
    """Train under the runtime's ``propagate`` KV policy (CALM state propagation).

    At decode time a token that exits after layer e never runs layers e..L-1; the runtime fills their
    K/V from the exit hidden state h_e instead of the true h_l. Later tokens then attend to those
    approximate K/V, and that approximation (not the exit decision) is where a propagate run loses
    agreement against exact K/V. Training the same way teaches the deep layers to read such K/V and
    the shallow layers to produce states that serve as K/V sources.

    Which positions exit follows the runtime: after each layer in ``exit_layers`` the shared head's
    max probability (no gradient) is compared with ``threshold``. The exited positions still run
    every layer here (their own final-layer loss keeps training the deep path); only the K/V that
    *other* positions read from them come from h_e.
    """
    exit_layers: tuple[int, ...]
    threshold: float


NO_EXITS = PropagatePlan((), 1.0)  # no position ever exits: the plain forward


@dataclass
class PropagateStats:
    exited: dict[int, float]  # share of positions that exited at each exit layer


def layer_with_kv_source(layer, h: torch.Tensor, kv_source: torch.Tensor,
                         pe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One Llama decoder layer whose queries read h [B, T, D] and whose keys/values read kv_source
    [B, T, D] (same norm, same projections). With kv_source is h it equals ``layer(h, ...)``."""
    attn = layer.self_attn
    B, T, _ = h.shape
    hd = attn.head_dim
    x = layer.input_layernorm(h)
    xs = x if kv_source is h else layer.input_layernorm(kv_source)
    q = attn.q_proj(x).view(B, T, -1, hd).transpose(1, 2)          # [B, H, T, hd]
    k = attn.k_proj(xs).view(B, T, -1, hd).transpose(1, 2)         # [B, Hkv, T, hd]
    v = attn.v_proj(xs).view(B, T, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pe)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                       enable_gqa=attn.num_key_value_groups > 1)  # [B, H, T, hd]
    h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def forward_layers_propagate(model: LlamaForCausalLM, ids: torch.Tensor, plan: PropagatePlan,
                             keep: set[int] | None = None, drop: set[int] | None = None,
                             ) -> tuple[torch.Tensor, dict[int, torch.Tensor], PropagateStats, torch.Tensor]:
    """``forward_layers`` under the propagate policy of ``plan`` (with ``NO_EXITS`` it is the plain forward:
    no K/V source is ever set, so every layer runs as Hugging Face's own).

    Returns (final hidden [B, T, D], kept {l: [B, T, D]}, stats, exit_layer [B, T]) where exit_layer
    is the layer each position exited after (L for positions that ran to the end).
    """
    inner = model.model
    keep, drop = keep or set(), drop or set()
    B, T = ids.shape
    L = len(inner.layers)
    h = inner.embed_tokens(ids)                                   # [B, T, D]
    pos = torch.arange(T, device=ids.device).unsqueeze(0)         # [1, T]
    pe = inner.rotary_emb(h, position_ids=pos)                    # (cos, sin), each [1, T, head_dim]
    exit_layer = torch.full((B, T), L, dtype=torch.long, device=ids.device)
    source = None  # [B, T, D]: the K/V source of exited positions (their h at the exit), else unused
    kept, shares = {}, {}
    for i, layer in enumerate(inner.layers):
        if i in plan.exit_layers:
            with torch.no_grad():
                conf = torch.softmax(head(model, h).float(), dim=-1).amax(-1)  # [B, T]
            new = (conf > plan.threshold) & (exit_layer == L)
            shares[i] = new.float().mean().item()
            exit_layer = torch.where(new, i, exit_layer)
            source = torch.where(new[..., None], h, h if source is None else source)
        if i not in drop:
            if source is None:
                h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
            else:
                kv_source = torch.where((exit_layer < L)[..., None], source, h)
                h = layer_with_kv_source(layer, h, kv_source, pe)
        if i + 1 in keep:
            kept[i + 1] = h
    return h, kept, PropagateStats(shares), exit_layer
