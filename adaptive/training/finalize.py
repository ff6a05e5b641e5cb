"""``python -m adaptive finalize-model``: turn an exported checkpoint into the bundled model.

Stages, in order, each skippable (``--skip-<stage>``) or, where marked, opt-in (``--with-<stage>``):

  draft-vocab  token counts over the train split -> ``draft_vocab.json``
  datastore    corpus 3-grams for lookup drafting (``build_datastore``) -> ``ngram_datastore.safetensors``
  exits        tuned-lens exit adapters (``train_exits``) -> ``exit_adapters.safetensors``
  classifier   learned exit classifier (``train_exit_classifier``) -> ``exit_classifier.safetensors``
  kv-fill      K/V fill maps of ``propagate`` (``fit_kv_fill``): least squares, then trained on the damage
               they do downstream (``--kv-fill-refine-steps``) -> ``kv_fill.safetensors``; opt-in
               (``--with-kv-fill``; see ``adaptive/kv_fill.py`` for what it measured on the bundled model)
  evaluate     per-layer loss and agreement on the test split, before and after adapters
  calibrate    the default early-exit setting and speculative priors -> ``adaptive_defaults.json``
  speculative-priors
               only the speculative priors, for the runtime's current draft depths, on the calibration
               prompts the report records (``refresh_acceptance_priors``); opt-in (``--with-speculative-priors``):
               calibrate computes them too, this is for when the draft depths change
  certify      Learn-then-Test certificate for the calibrated family (``ltt_calibrate``)
               -> ``calibration_certificate.json`` (the default setting itself is left as calibrated)
  gate         the prompt-level gate from real runs of every path (``train_gate``) -> ``prompt_gate.safetensors``
  card         early-exit decoding table and completions on the test split -> ``README.md``

Every measurement lands in ``finalize_report.json`` next to the model (merged stage by stage), so a
skipped stage keeps its earlier numbers and the card can always be re-rendered. Run it only after
training has finished: ``train-model`` replaces the model folder wholesale at each export, sidecars
included.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..loading import weights_hash

OPT_IN_STAGES = ("kv-fill", "speculative-priors")  # run only when asked for (see above)
STAGES = ("draft-vocab", "datastore", "exits", "classifier", "kv-fill", "evaluate", "calibrate", "speculative-priors",
          "certify", "gate", "card")


def _margin(text: str) -> float:
    """--margin: a number in [0, 0.1] (the measured margin is the default)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value <= 0.1:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.1], got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled assets/pycoder-8l)")
    for stage in STAGES:
        if stage in OPT_IN_STAGES:
            p.add_argument(f"--with-{stage}", action="store_true", help=f"run the {stage} stage (off by default)")
        else:
            p.add_argument(f"--skip-{stage}", action="store_true", help=f"skip the {stage} stage")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leaves a core to the rest)")
    p.add_argument("--log", default=None, help="training log for the card (default: runs/<model name>/log.jsonl)")
    g = p.add_argument_group("exits")
    g.add_argument("--exit-steps", type=int, default=400)
    g.add_argument("--exit-minutes", type=float, default=10.0)
    g.add_argument("--exit-run-dir", default=None,
                   help="resume folder (default: runs/exits/<name>-<weights hash>, so another checkpoint never resumes it)")
    g = p.add_argument_group("classifier")
    g.add_argument("--classifier-steps", type=int, default=250)
    g.add_argument("--classifier-minutes", type=float, default=6.0)
    g.add_argument("--classifier-shortlist", type=int, default=1024,
                   help="label agreement over this exit shortlist (0: full vocabulary)")
    g = p.add_argument_group("kv-fill")
    g.add_argument("--kv-fill-windows", type=int, default=512, help="training windows of 256 tokens for the fit")
    g.add_argument("--kv-fill-refine-steps", type=int, default=2000,
                   help="then train the maps on downstream damage for this many steps of 4 windows (0: fit only)")
    g.add_argument("--kv-fill-run-dir", default=None,
                   help="refinement checkpoints (default: fit-kv-fill's, runs/kv-fill/<model name>; a run of other "
                        "weights is never resumed)")
    g = p.add_argument_group("certify")
    g.add_argument("--epsilon", type=float, default=0.01)
    g.add_argument("--delta", type=float, default=0.1)
    g.add_argument("--ltt-prompts", type=int, default=1200,
                   help="i.i.d. calibration windows: certifying epsilon=0.01 at delta=0.1 needs several hundred")
    g.add_argument("--ltt-tokens", type=int, default=8, help="reference tokens per calibration window")
    g.add_argument("--ltt-test-prompts", type=int, default=60)
    g = p.add_argument_group("gate")
    g.add_argument("--gate-prompts", type=int, default=600)
    g.add_argument("--gate-tokens", type=int, default=32, help="reference tokens per gate prompt")
    g.add_argument("--gate-run-dir", default=None, help="label cache (default: runs/gate/<name>-<weights hash>)")
    g = p.add_argument_group("evaluate")
    g.add_argument("--eval-windows", type=int, default=64)
    g.add_argument("--eval-window", type=int, default=512)
    g = p.add_argument_group("calibrate")
    g.add_argument("--target", type=float, default=0.99, help="teacher-forced agreement to reach")
    g.add_argument("--margin", type=_margin, default=None,
                   help="select at target + margin (selection bias); default: 1.645 prompt-level standard errors "
                        "of agreement on the calibration prompts, measured (a number fixes it)")
    g.add_argument("--cal-prompts", type=int, default=24)
    g.add_argument("--cal-new-tokens", type=int, default=128)
    g.add_argument("--holdout-prompts", type=int, default=24,
                   help="other validation prompts the chosen setting must also reach the target on (0: no check)")
    g.add_argument("--confirm-minutes", type=float, default=8.0, help="time for real decoding of the finalists")
    g.add_argument("--replay-families", type=int, default=40,
                   help="propagate families searched by exact replay (0: none)")
    g.add_argument("--replay-minutes", type=float, default=6.0, help="time for the replay search")
    g.add_argument("--offset-families", type=int, default=3,
                   help="replayed passes given per-exit-layer thresholds by coordinate descent (0: none)")
    g.add_argument("--draft-vocab-size", type=int, default=512)
    g = p.add_argument_group("card")
    g.add_argument("--card-prompts", type=int, default=48,
                   help="test-split prompts of the decoding table (12 were too few to tell 99%% from 98.5%%)")
    g.add_argument("--card-new-tokens", type=int, default=128)
    g.add_argument("--card-repeats", type=int, default=3)


def rt_hidden(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["hidden_size"])


def _warn_if_training(model_dir: Path, log_path: Path) -> None:
    """train-model's next export would delete every sidecar written here."""
    if not log_path.is_file():
        return
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    if lines and json.loads(lines[-1]).get("kind") != "final":
        print(f"warning: {log_path} has no final record: if training is still running, its next export replaces "
              f"{model_dir} and deletes what this writes")


def main(args) -> int:
    from ..runtime import DEFAULT_MODEL_DIR, Runtime
    from . import calibrate_exits, evaluate, model_card

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: no checkpoint in {model_dir}")
    log_path = Path(args.log) if args.log else model_card.default_log_path(model_dir)
    _warn_if_training(model_dir, log_path)
    report_path = model_dir / model_card.REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    timings = report.setdefault("seconds", {})

    def save():
        report_path.write_text(json.dumps(report, indent=1) + "\n")

    def wanted(stage: str) -> bool:
        name = stage.replace("-", "_")
        return getattr(args, f"with_{name}") if stage in OPT_IN_STAGES else not getattr(args, f"skip_{name}")

    todo = [s for s in STAGES if wanted(s)]
    for n, stage in enumerate(todo, 1):
        print(f"[finalize] stage {n}/{len(todo)}: {stage}", flush=True)
        start = time.time()
        if stage == "draft-vocab":
            path = evaluate.build_draft_vocab(model_dir)
            print(f"wrote {path}")
        elif stage == "datastore":
            from . import build_datastore

            build_datastore.main(argparse.Namespace(model=str(model_dir), text=None, min_count=3, min_share=0.5,
                                                    out=None))
        elif stage == "exits":
            from . import train_exits

            run_dir = args.exit_run_dir or f"runs/exits/{model_dir.name}-{weights_hash(model_dir)}"
            train_exits.main(argparse.Namespace(
                model=str(model_dir), text=None, out=None, run_dir=run_dir, steps=args.exit_steps,
                max_minutes=args.exit_minutes, batch=8, seq_len=256, positions=512, lr=1e-3, seed=0,
                checkpoint_minutes=5.0, threads=args.threads))
        elif stage == "classifier":
            from . import train_exit_classifier

            train_exit_classifier.main(argparse.Namespace(
                model=str(model_dir), text=None, out=None, steps=args.classifier_steps,
                max_minutes=args.classifier_minutes, batch=8, seq_len=256, positions=1024, hidden=32,
                shortlist=args.classifier_shortlist if (model_dir / "draft_vocab.json").is_file() else 0,
                lr=3e-3, seed=0, threads=args.threads, policy_weight=0.5, disagree_cost=20.0))
        elif stage == "kv-fill":
            from . import fit_kv_fill

            report["kv_fill"] = fit_kv_fill.run(argparse.Namespace(
                model=str(model_dir), text=None, out=None, windows=args.kv_fill_windows, seq_len=256, ridge=1e-3,
                seed=0, threads=args.threads, refine_steps=args.kv_fill_refine_steps, refine_batch=4,
                refine_lr=2e-4, refine_run_dir=args.kv_fill_run_dir))
        elif stage == "certify":
            from . import ltt_calibrate

            chosen = (report.get("calibration") or {}).get("chosen") or {}
            cert_path = model_dir / "calibration_certificate.json"
            # A certificate from an earlier run belongs to other weights or settings: it must not outlive
            # a run that certifies nothing (the runtime and the scheduler would trust it).
            cert_path.unlink(missing_ok=True)
            status = ltt_calibrate.main(argparse.Namespace(
                model=str(model_dir), text=None, epsilon=args.epsilon, delta=args.delta, prompts=args.ltt_prompts,
                tokens=args.ltt_tokens, context=96, test_prompts=args.ltt_test_prompts, measure=chosen.get("measure"),
                exit_layers=",".join(str(k) for k in chosen["exit_layers"]) if chosen.get("exit_layers") else None,
                exit_vocab_size=chosen.get("exit_vocab_size"), kv_policy=chosen.get("kv_policy"), seed=0,
                vocab_exit=str(chosen["vocab_exit"]) if chosen.get("vocab_exit") is not None else "off",
                write_defaults=False, threads=args.threads))
            report["certificate"] = json.loads(cert_path.read_text()) if status == 0 and cert_path.is_file() else None
        elif stage == "gate":
            from . import train_gate

            run_dir = args.gate_run_dir or f"runs/gate/{model_dir.name}-{weights_hash(model_dir)}"
            train_gate.main(argparse.Namespace(model=str(model_dir), text=None, prompts=args.gate_prompts,
                                               tokens=args.gate_tokens, tau=0.9, l2=None, run_dir=run_dir, seed=0,
                                               threads=args.threads))
            from ..gating import GATE_FILE, PromptGate

            report["gate"] = PromptGate.load(model_dir / GATE_FILE, rt_hidden(model_dir), {"light": 0, "standard": 0, "full": 0}).report
        elif stage == "evaluate":
            rt = Runtime.from_pretrained(model_dir)
            ev = evaluate.evaluate(rt, "test", args.eval_windows, args.eval_window)
            report["evaluation"] = ev.to_dict()
            print(evaluate.format_table(ev))
        elif stage == "calibrate":
            rt = Runtime.from_pretrained(model_dir)
            cal = calibrate_exits.calibrate(rt, target=args.target, margin=args.margin, num_prompts=args.cal_prompts,
                                            new_tokens=args.cal_new_tokens, confirm_minutes=args.confirm_minutes,
                                            replay_families=args.replay_families, replay_minutes=args.replay_minutes,
                                            offset_families=args.offset_families,
                                            holdout_prompts=args.holdout_prompts,
                                            draft_vocab_size=args.draft_vocab_size)
            calibrate_exits.write_defaults(model_dir, cal)
            report["calibration"] = cal.to_dict()
            print(f"chosen {json.dumps(cal.chosen)}: agreement {cal.agreement:.4f}, compute fraction "
                  f"{cal.compute_fraction:.3f}, meets target: {cal.meets_target}; priors {cal.acceptance_priors}")
        elif stage == "speculative-priors":
            if not report.get("calibration"):
                raise SystemExit("error: the speculative-priors stage reuses the calibration prompts, and "
                                 f"{report_path} has no calibration yet: run the calibrate stage first")
            rt = Runtime.from_pretrained(model_dir)
            priors = calibrate_exits.refresh_acceptance_priors(rt, report["calibration"])
            calibrate_exits.write_acceptance_priors(model_dir, priors, report["calibration"]["draft_vocab_size"])
            print(f"acceptance priors {report['calibration']['acceptance_priors']} -> {priors}")
            report["calibration"]["acceptance_priors"] = priors
        elif stage == "card":
            cal = report.get("calibration")
            thresholds = cal["neighbour_thresholds"] if cal else [0.8, 0.9, 0.95]
            report["decoding"] = model_card.decoding_table(model_dir, thresholds, args.card_prompts,
                                                           args.card_new_tokens, args.card_repeats)
            report["completions"] = model_card.completions_to_dicts(model_card.completions(model_dir))
        timings[stage] = round(time.time() - start, 1)
        save()
        print(f"[finalize] {stage} took {timings[stage] / 60:.1f} min", flush=True)
    # keep the training log's summary with the report: a card re-rendered from a clone has no runs/ folder
    report["training_log"] = model_card.training_summary(log_path) or report.get("training_log", {})
    save()
    path = model_card.write_card(model_dir, report, log_path)
    print(f"wrote {path}; stage times (s): {json.dumps(timings)}")
    return 0
