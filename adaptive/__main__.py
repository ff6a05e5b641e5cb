"""Command line: ``python -m adaptive {generate,bench,train-model,train-exits,finalize-model}``.

Errors the runtime raises on purpose (bad input, missing files) print as one line and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import AdaptiveError

# Sub-commands whose code lives elsewhere: (module, help). Imported only when used, so `generate` starts fast.
_EXTERNAL_COMMANDS = {
    "train-model": ("adaptive.training.train_model", "train the bundled default model (resumable)"),
    "train-exits": ("adaptive.training.train_exits", "train per-layer exit adapters for a checkpoint"),
    "train-exit-classifier": ("adaptive.training.train_exit_classifier",
                              "train the learned exit classifier (measure='classifier') for a checkpoint"),
    "calibrate": ("adaptive.training.ltt_calibrate",
                  "certify an early-exit threshold by Learn-then-Test (writes a certificate next to the model)"),
    "fit-kv-fill": ("adaptive.training.fit_kv_fill",
                    "fit the learned K/V fill of the propagate policy for a checkpoint (experimental)"),
    "build-datastore": ("adaptive.training.build_datastore",
                        "the corpus n-gram datastore (lookup drafts, self-draft guesses)"),
    "train-gate": ("adaptive.training.train_gate",
                   "train the prompt-level gate (which path is enough for a prompt) from real runs"),
    "finalize-model": ("adaptive.training.finalize",
                       "bundled model: draft vocabulary, exit adapters, calibration, model card"),
}


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text and print it (optionally write the full trace)")
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="full", help="full | early_exit | speculative | auto")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--measure", default=None, help="max_prob | margin | entropy | cosine | patience")
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--kv-policy", default=None, help="propagate | defer")
    p.add_argument("--exit-layers", default=None, help="comma-separated layer counts where tokens may exit")
    p.add_argument("--vocab-exit", default=None,
                   help="the vocabulary exit's threshold (skip the full LM head at full depth), or 'off'")
    p.add_argument("--exit-vocab-size", type=int, default=None,
                   help="exit heads over the N most frequent tokens + the prompt's (0: full vocabulary)")
    p.add_argument("--vocab-exit-size", type=int, default=None,
                   help="the vocabulary exit's own shortlist size (0: the exit shortlist)")
    p.add_argument("--exit-adapters", default=None, choices=("on", "off"),
                   help="exits read the model's trained exit adapters (on) or the plain logit lens (off)")
    p.add_argument("--path", default=None, help="mode full: light | standard | full")
    p.add_argument("--drafter", default=None, help="mode speculative: self | lookup | draft_model")
    p.add_argument("--policy", default=None, help="mode auto: quality | latency | budget | load")
    p.add_argument("--epsilon", type=float, default=None, help="mode auto: allowed disagreement with full depth")
    p.add_argument("--latency-ms", type=float, default=None, help="mode auto, policy latency: ms/token target")
    p.add_argument("--budget", type=float, default=None, help="mode auto, policy budget: compute fraction")
    p.add_argument("--queue-depth", type=int, default=None, help="mode auto, policy load: requests waiting")
    p.add_argument("--audit-rate", type=float, default=None, help="mode auto: share of lossy requests audited")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result with every token trace")
    p.add_argument("--stats", action="store_true", help="print the stats after the text")
    p.add_argument("--trust-remote-code", action="store_true")


def _generate(args) -> int:
    import json

    from .config import exit_knobs_from_flags
    from .runtime import Runtime

    rt = Runtime.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    options = {name: getattr(args, name) for name in ("threshold", "measure", "min_layer", "kv_policy", "top_k", "top_p",
                                                      "exit_vocab_size", "vocab_exit_size", "path", "drafter",
                                                      "policy", "epsilon", "latency_ms", "budget", "queue_depth",
                                                      "audit_rate")
               if getattr(args, name) is not None}
    if args.exit_adapters is not None:
        options["exit_adapters"] = args.exit_adapters == "on"
    try:
        options.update(exit_knobs_from_flags(args.exit_layers, args.vocab_exit))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    stream = rt.stream(args.prompt, max_new_tokens=args.max_new_tokens, mode=args.mode,
                       temperature=args.temperature, seed=args.seed, **options)
    for trace in stream:
        sys.stdout.write(trace.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    result = stream.result
    if args.stats:
        print(json.dumps({k: v for k, v in result.stats.items()}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            f.write(result.to_json())
    return 0


def _add_bench(sub) -> None:
    from .bench import add_arguments

    p = sub.add_parser("bench", help="side-by-side measurements in one process")
    add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptive", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in _EXTERNAL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:  # only import the training code when it is asked for
            try:
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError as e:
                print(f"error: {name} is not available: {e}", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            from .bench import main as bench_main
            return bench_main(args)
        return importlib.import_module(_EXTERNAL_COMMANDS[args.command][0]).main(args)
    except AdaptiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
