"""Per-layer evaluation of a checkpoint's exit heads on a corpus split, and the draft-vocabulary counts.

For each k = 1..L, the exit head after k layers (final norm + LM head, with or without the trained
adapter) is scored on a fixed set of token windows of the split:

  nats/token   mean cross-entropy of the next token
  bits/byte    total nats / (UTF-8 bytes of the target tokens) / ln 2, bytes counted exactly per token
  agreement    share of positions whose top-1 equals the final layer's top-1

Windows (documented so the numbers can be reproduced): the split's token stream is its documents in
corpus order, each followed by the end-of-text token (as ``token_cache`` builds it). ``num_windows``
windows of ``window + 1`` tokens start at evenly spaced offsets ``i * (N - window - 1) // (num_windows - 1)``;
each window scores its last ``window`` tokens given the ones before. No randomness, hence no seed.
End-of-text targets count 0 bytes but their loss is kept (slightly pessimistic bits/byte).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


# ---- tokens of a split ----------------------------------------------------------------------------
def _tokenizer_file(model_dir: Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; the split must be tokenised with the model's tokenizer")
    return Tokenizer.from_file(str(path)), path


def split_tokens(model_dir: str | Path, split: str, cache_dir: str | Path = "data/tokens") -> np.ndarray:
    """The split's token stream (documents in corpus order, each followed by end-of-text).

    Reads ``data/tokens/<split>.npy`` when its manifest says it was built from the same corpus with
    this tokenizer (training already paid for it); otherwise tokenises here, without writing a cache.
    """
    from . import corpus
    from .tokenizer import EOT, file_hash

    tok, tok_path = _tokenizer_file(Path(model_dir))
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / "manifest.json"
    if manifest_path.is_file() and (cache_dir / f"{split}.npy").is_file():
        entry = json.loads(manifest_path.read_text()).get(split, {})
        if entry.get("tokenizer") == file_hash(tok_path) and entry.get("corpus") == corpus.corpus_fingerprint(split):
            return np.load(cache_dir / f"{split}.npy").astype(np.int64)
    eot = tok.token_to_id(EOT)
    docs = [d.text for d in corpus.iter_documents(split)]
    parts = []
    for i in range(0, len(docs), 64):  # batches keep memory bounded; encode_batch runs in Rust
        for enc in tok.encode_batch(docs[i:i + 64], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + ([eot] if eot is not None else []), dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens: 0).

    Byte-level BPE tokens are strings over GPT-2's 256-character byte alphabet, so mapping each
    character back to its byte gives the exact count, even for tokens that hold part of a multi-byte
    character (decoding such a token alone would give U+FFFD and a wrong count). Tokenizers that are
    not byte-level fall back to the length of each token decoded on its own.
    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(backend.get_added_tokens_decoder().keys())
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for token, i in backend.get_vocab(with_added_tokens=False).items():
        if i >= vocab_size or i in special:
            continue
        if all(c in byte_of for c in token):
            lengths[i] = len(token)  # one character per byte
        else:
            lengths[i] = len(backend.decode([i]).encode("utf-8"))
    return lengths


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    """Total nats over some text / its UTF-8 bytes / ln 2."""
    return total_nats / max(num_bytes, 1) / LN2


# ---- windows --------------------------------------------------------------------------------------
@dataclass
class Windows:
    ids: torch.Tensor  # (W, T+1) token ids; position t predicts t+1
    starts: list[int]  # offset of each window in the split's stream
    target_bytes: int  # UTF-8 bytes of all targets ids[:, 1:]

    @property
    def num_targets(self) -> int:
        return self.ids.shape[0] * (self.ids.shape[1] - 1)


def select_windows(stream: np.ndarray, num_windows: int, window: int, byte_lengths: np.ndarray) -> Windows:
    """``num_windows`` windows of ``window + 1`` tokens at evenly spaced offsets (see the module docstring)."""
    span = window + 1
    if len(stream) < span:
        raise SystemExit(f"error: the split has {len(stream)} tokens, fewer than one window of {span}")
    last = len(stream) - span
    starts = [0] if num_windows == 1 else [i * last // (num_windows - 1) for i in range(num_windows)]
    ids = torch.from_numpy(np.stack([stream[s:s + span] for s in starts]).astype(np.int64))
    return Windows(ids=ids, starts=starts, target_bytes=int(byte_lengths[ids[:, 1:].numpy()].sum()))


# ---- the per-layer table --------------------------------------------------------------------------
@dataclass
class LayerRow:
    layers: int  # k: exit after k layers
    nats: float  # logit lens (no adapter)
    bits_per_byte: float
    agreement: float  # top-1 equals the final layer's top-1
    tuned_nats: float | None = None  # with the trained adapter (None: no adapters)
    tuned_bits_per_byte: float | None = None
    tuned_agreement: float | None = None


@dataclass
class Evaluation:
    split: str
    num_windows: int
    window: int
    num_targets: int
    target_bytes: int
    adapters: str  # where the "tuned" columns come from, or "none"
    seconds: float
    rows: list[LayerRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        return cls(**{**d, "rows": [LayerRow(**r) for r in d["rows"]]})


@torch.inference_mode()
def evaluate_windows(rt, windows: Windows, batch: int = 4, split: str = "", progress: bool = True) -> Evaluation:
    """Score every exit head, with and without adapters, on ``windows``; batched, one forward per batch."""
    from tqdm import tqdm

    model, heads = rt.model, rt.heads
    L = model.spec.num_layers
    tuned = [k for k in range(1, L) if heads.has_adapter(k)]
    nats = np.zeros(L + 1)
    tuned_nats = np.zeros(L + 1)
    agree = np.zeros(L + 1)
    tuned_agree = np.zeros(L + 1)
    start = time.time()
    W = windows.ids.shape[0]
    for b0 in tqdm(range(0, W, batch), desc="evaluate", unit="batch", disable=not progress):
        ids = windows.ids[b0:b0 + batch].to(model.device)  # (B, T+1)
        x, target = ids[:, :-1], ids[:, 1:].reshape(-1)  # (B, T), (B*T,)
        cache = model.new_cache(x.shape[0], x.shape[1])
        h = model.embed(x, 0)
        per_layer = []
        for layer in range(L):
            h = model.layer(layer, h, 0, cache)
            per_layer.append(h)
        final = model.head(h).float().reshape(-1, model.spec.vocab_size)  # (B*T, V)
        final_top = final.argmax(-1)
        for k in range(1, L + 1):
            hk = per_layer[k - 1]
            lens_logits = final if k == L else model.head(hk).float().reshape(-1, model.spec.vocab_size)
            nats[k] += float(F.cross_entropy(lens_logits, target, reduction="sum"))
            agree[k] += float((lens_logits.argmax(-1) == final_top).sum())
            if k in tuned:
                t_logits = heads.logits(hk, k).float().reshape(-1, model.spec.vocab_size)
                tuned_nats[k] += float(F.cross_entropy(t_logits, target, reduction="sum"))
                tuned_agree[k] += float((t_logits.argmax(-1) == final_top).sum())
    # Without an adapter at k (and always at k = L) the tuned head is the lens itself.
    for k in range(1, L + 1):
        if k not in tuned:
            tuned_nats[k], tuned_agree[k] = nats[k], agree[k]
    n, nbytes = windows.num_targets, windows.target_bytes
    rows = []
    for k in range(1, L + 1):
        row = LayerRow(layers=k, nats=nats[k] / n, bits_per_byte=bits_per_byte(nats[k], nbytes), agreement=agree[k] / n)
        if tuned:
            row.tuned_nats = tuned_nats[k] / n
            row.tuned_bits_per_byte = bits_per_byte(tuned_nats[k], nbytes)
            row.tuned_agreement = tuned_agree[k] / n
        rows.append(row)
    return Evaluation(split=split, num_windows=W, window=windows.ids.shape[1] - 1, num_targets=n, target_bytes=nbytes,
                      adapters=heads.source if tuned else "none", seconds=time.time() - start, rows=rows)


def evaluate(rt, split: str = "test", num_windows: int = 64, window: int = 512, batch: int = 4,
             cache_dir: str | Path = "data/tokens") -> Evaluation:
    """The per-layer table of ``rt`` (loaded from a directory) on ``split``; see the module docstring."""
    stream = split_tokens(rt.directory, split, cache_dir)
    window = min(window, rt.spec.max_positions)
    windows = select_windows(stream, num_windows, window, token_byte_lengths(rt.tokenizer, rt.spec.vocab_size))
    return evaluate_windows(rt, windows, batch, split)


def format_table(ev: Evaluation) -> str:
    """Markdown table: one row per exit depth, lens columns then adapter columns."""
    tuned = ev.rows and ev.rows[0].tuned_nats is not None
    head = "| layers | nats/token | bits/byte | agreement with final |"
    sep = "|---:|---:|---:|---:|"
    if tuned:
        head += " nats/token (adapters) | bits/byte (adapters) | agreement (adapters) |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for r in ev.rows:
        line = f"| {r.layers} | {r.nats:.3f} | {r.bits_per_byte:.3f} | {r.agreement:.3f} |"
        if tuned:
            line += f" {r.tuned_nats:.3f} | {r.tuned_bits_per_byte:.3f} | {r.tuned_agreement:.3f} |"
        lines.append(line)
    return "\n".join(lines)


# ---- draft vocabulary -----------------------------------------------------------------------------
def build_draft_vocab(model_dir: str | Path, split: str = "train", cache_dir: str | Path = "data/tokens") -> Path:
    """Count tokens over ``split`` and write ``draft_vocab.json`` (ids by decreasing count) next to the model."""
    from ..draft_vocab import DRAFT_VOCAB_FILE, ranking_from_counts, save_ranking

    model_dir = Path(model_dir)
    stream = split_tokens(model_dir, split, cache_dir)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    counts = np.bincount(stream, minlength=vocab_size)
    ids, cts = ranking_from_counts(counts.tolist())
    path = model_dir / DRAFT_VOCAB_FILE
    save_ranking(path, ids, cts, source=f"token counts over the {split} split ({len(stream)} tokens), "
                                        "see adaptive/training/corpus.py")
    return path
