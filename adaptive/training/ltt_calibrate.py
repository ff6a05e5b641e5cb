"""``python -m adaptive calibrate``: certify an early-exit threshold by Learn-then-Test.

1. Calibration prompts: ``--prompts`` windows drawn uniformly at random (seeded, with replacement)
   from the validation text, so they are i.i.d. draws from one distribution, as LTT requires; each is
   followed by the full-depth greedy continuation of ``--tokens`` tokens (the reference).
2. One full-depth readout per prompt (``calibrate_exits.readout``) gives every layer's hidden state at
   the positions that predict the reference. For the setting under test (measure, exit layers, exit
   shortlist) it yields, per token and exit point, the confidence and whether the exit head's token
   equals the reference token. For a threshold λ a token exits at the first exit point whose
   confidence reaches λ; its loss is 1 when that exit's token differs from full depth's. This is exact
   for ``kv_policy="defer"`` (exact K/V); for ``propagate`` the certified λ is confirmed by real decoding.
3. ``adaptive.calibration.learn_then_test`` over a grid of λ; the certificate is written next to the
   model, and ``--write-defaults`` makes the certified setting the model's early-exit default.
4. Held-out check: real teacher-forced decoding with the certified setting on TEST-split windows;
   the observed agreement is stored in the certificate (it should be >= 1 - ε).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from ..calibration import CERTIFICATE_FILE, Certificate, calibration_set_hash, learn_then_test
from ..config import exit_knobs_from_flags
from ..exits import make_measure
from ..runtime import DEFAULTS_FILE, Runtime


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--text", default=None, help="a local text file instead of the stdlib validation/test splits "
                                                 "(its first 70%% of tokens calibrate, the rest is held out)")
    p.add_argument("--epsilon", type=float, default=0.01, help="allowed disagreement with full depth")
    p.add_argument("--delta", type=float, default=0.1, help="allowed probability that the guarantee fails")
    p.add_argument("--prompts", type=int, default=300, help="calibration prompts (i.i.d. windows)")
    p.add_argument("--tokens", type=int, default=32, help="reference tokens per prompt")
    p.add_argument("--context", type=int, default=96, help="context tokens per prompt")
    p.add_argument("--test-prompts", type=int, default=60, help="held-out test-split prompts for the check")
    p.add_argument("--measure", default=None, help="default: the model's early-exit default")
    p.add_argument("--exit-layers", default=None, help="comma-separated; default: the model's default")
    p.add_argument("--exit-vocab-size", type=int, default=None)
    p.add_argument("--kv-policy", default=None)
    p.add_argument("--vocab-exit", default=None,
                   help="the vocabulary exit's own (fixed) threshold, or 'off'; default: the model's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-defaults", action="store_true", help="make the certified setting the default")
    p.add_argument("--threads", type=int, default=None)


def _stream(rt: Runtime, split: str, text_file: str | None) -> list[int]:
    """Token stream of a stdlib split, or of the calibration (first 70%) / held-out part of a text file."""
    if text_file:
        ids = rt.tokenizer.encode(Path(text_file).read_text(encoding="utf-8"), add_special_tokens=False)
        cut = int(0.7 * len(ids))
        return ids[:cut] if split == "validation" else ids[cut:]
    from .corpus import iter_documents

    eos = rt.spec.eos_token_ids[0] if rt.spec.eos_token_ids else None
    stream: list[int] = []
    for doc in iter_documents(split):
        stream.extend(rt.tokenizer.encode(doc.text, add_special_tokens=False))
        if eos is not None:
            stream.append(eos)
    return stream


def _windows(rt: Runtime, split: str, count: int, context: int, seed: int, text_file: str | None = None) -> list[list[int]]:
    """``count`` windows of ``context`` tokens drawn uniformly (with replacement) from a token stream."""
    stream = _stream(rt, split, text_file)
    if len(stream) <= context:
        raise SystemExit(f"error: the {split} text has only {len(stream)} tokens")
    rng = random.Random(seed)
    return [stream[s:s + context] for s in (rng.randrange(0, len(stream) - context) for _ in range(count))]


@torch.inference_mode()
def exit_table(rt: Runtime, prompt: list[int], reference: list[int], cfg, exit_ids,
               vocab_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) confidences and (K, N) agreement with the reference at each exit point, for one prompt.
    ``vocab_ids``: the vocabulary exit's own shortlist (None: ``exit_ids``)."""
    from .calibrate_exits import PromptCase, readout

    states = readout(rt, PromptCase("", prompt, reference))  # (L+1, N, d)
    measure = make_measure(cfg.measure, cfg.patience, rt.exit_classifier)
    points = sorted(cfg.exit_points(rt.spec.num_layers))
    ref = torch.tensor(reference)
    weight = rt.model.w.lm_head if exit_ids is None else rt.model.w.lm_head.index_select(0, exit_ids)
    confs, agree = [], []
    L = rt.spec.num_layers
    heads = rt.heads.for_request(cfg.exit_adapters)
    for k in range(1, L):
        h, prev = states[k], states[k - 1]
        logits = torch.nn.functional.linear(rt.model.final_norm(heads.adapt(h, k)), weight)  # (N, n)
        conf = measure.score(logits if measure.needs_logits else None, h, prev, layer=k)
        if k in points:
            top = logits.argmax(-1)
            tokens = top if exit_ids is None else exit_ids[top]
            # An offset layer exits at λ + offset: shifting its confidence down by the offset lets one λ
            # be tested for every exit point (the offsets stay fixed, as the certificate states).
            confs.append(conf.float().numpy() - (cfg.threshold_at(k) - cfg.threshold))
            agree.append((tokens == ref).numpy())
    vocab_ids = exit_ids if vocab_ids is None else vocab_ids
    if cfg.vocab_exit is not None and vocab_ids is not None:
        # The vocabulary exit at full depth has its own fixed threshold: as an extra exit point, its
        # confidence is 2.0 (always passes) where it reaches vocab_exit and -1.0 (never) elsewhere.
        rows = weight if vocab_ids is exit_ids else rt.model.w.lm_head.index_select(0, vocab_ids)
        logits = torch.nn.functional.linear(rt.model.final_norm(states[L]), rows)
        passed = measure.score(logits, states[L], states[L - 1], layer=L) >= cfg.vocab_exit
        confs.append(np.where(passed.numpy(), 2.0, -1.0))
        agree.append((vocab_ids[logits.argmax(-1)] == ref).numpy())
    return np.stack(confs), np.stack(agree)


def prompt_losses(confs: np.ndarray, agree: np.ndarray, thresholds: list[float]) -> list[float]:
    """Share of tokens whose exit at threshold λ disagrees with full depth, for each λ."""
    out = []
    for lam in thresholds:
        exits = confs >= lam  # (K, N)
        first = np.where(exits.any(0), exits.argmax(0), -1)  # exit point index per token, -1 = full depth
        wrong = [(f >= 0 and not agree[f, n]) for n, f in enumerate(first)]
        out.append(float(np.mean(wrong)))
    return out


def main(args) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = Runtime.from_pretrained(args.model)
    knobs = {k: v for k, v in (("measure", args.measure), ("exit_vocab_size", args.exit_vocab_size),
                                ("kv_policy", args.kv_policy)) if v is not None}
    try:
        knobs.update(exit_knobs_from_flags(args.exit_layers, args.vocab_exit))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = rt.early_exit_config(**knobs)
    if cfg.measure == "attention":
        print("error: measure 'attention' reads the decode-time cache; the calibration readout does not "
              "support it yet (use max_prob, margin, entropy, cosine, patience or classifier)", file=sys.stderr)
        return 2
    prompts = _windows(rt, "validation", args.prompts, args.context, args.seed, args.text)
    losses_by_prompt = []
    # Dense over (0, 1): logit measures like margin live near 0, probabilities near 1. Fixed-sequence
    # testing pays nothing for a long grid: it stops at the first threshold it cannot certify.
    grid = np.concatenate([np.geomspace(1e-3, 0.3, 40), np.linspace(0.3, 0.999, 71), [0.995, 0.998]])
    thresholds = sorted({round(float(x), 4) for x in grid}, reverse=True)
    for prompt in tqdm(prompts, desc="calibration prompts"):
        reference = rt.generate(prompt, max_new_tokens=args.tokens, stop_at_eos=False).token_ids
        exit_ids = rt._shortlist(cfg.exit_vocab_size, prompt)
        vocab_ids = rt._shortlist(cfg.vocab_exit_size, prompt) if cfg.vocab_exit_size else None
        confs, agree = exit_table(rt, prompt, reference, cfg, exit_ids, vocab_ids)
        losses_by_prompt.append(prompt_losses(confs, agree, thresholds))
    losses = [list(col) for col in zip(*losses_by_prompt)]  # (thresholds, prompts)
    result = learn_then_test(thresholds, losses, args.epsilon, args.delta)
    print(json.dumps({"certified_threshold": result.threshold, "n": result.n,
                      "last_tests": result.tested[-3:]}, indent=1))
    if not result.certified:
        print("no threshold could be certified: more prompts, a larger epsilon or delta are needed")
        return 1
    tested = next(t for t in result.tested if t["threshold"] == result.threshold)
    exit_layers = sorted(cfg.exit_points(rt.spec.num_layers))
    # Held-out check with the real decoder (the policy's own K/V), teacher-forced on TEST windows.
    agree = total = 0
    settings = dict(measure=cfg.measure, threshold=result.threshold, exit_layers=tuple(exit_layers),
                    exit_vocab_size=cfg.exit_vocab_size, kv_policy=cfg.kv_policy, vocab_exit=cfg.vocab_exit,
                    vocab_exit_size=cfg.vocab_exit_size, threshold_offsets=cfg.offsets_dict(),
                    exit_adapters=cfg.exit_adapters)
    for prompt in tqdm(_windows(rt, "test", args.test_prompts, args.context, args.seed + 1, args.text),
                       desc="test check"):
        reference = rt.generate(prompt, max_new_tokens=args.tokens, stop_at_eos=False).token_ids
        forced = rt.generate(prompt, max_new_tokens=args.tokens, stop_at_eos=False, mode="early_exit",
                             follow=reference, **settings)
        agree += sum(a == b for a, b in zip(forced.token_ids, reference))
        total += len(reference)
    cert = Certificate(epsilon=args.epsilon, delta=args.delta, n=result.n, measure=cfg.measure,
                       threshold=result.threshold, exit_layers=exit_layers, exit_vocab_size=cfg.exit_vocab_size,
                       kv_policy=cfg.kv_policy, calibration_set_sha256=calibration_set_hash(prompts),
                       observed_risk=tested["risk"], p_value=tested["p_value"], tokens_per_prompt=args.tokens,
                       test_agreement=agree / total, test_tokens=total, vocab_exit=cfg.vocab_exit,
                       vocab_exit_size=cfg.vocab_exit_size,
                       threshold_offsets=cfg.offsets_dict(), kv_fill=rt.kv_fill_source(),
                       exit_adapters=cfg.exit_adapters)
    path = Path(rt.directory) / CERTIFICATE_FILE
    cert.save(path)
    print(f"wrote {path}: threshold {result.threshold}, test agreement {agree / total:.4f} on {total} tokens")
    if args.write_defaults:
        defaults_path = Path(rt.directory) / DEFAULTS_FILE
        defaults = json.loads(defaults_path.read_text()) if defaults_path.is_file() else {}
        defaults["early_exit"] = {**defaults.get("early_exit", {}), **{k: (list(v) if isinstance(v, tuple) else v)
                                                                      for k, v in settings.items()}}
        defaults_path.write_text(json.dumps(defaults, indent=1))
    return 0
