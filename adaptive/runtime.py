"""``Runtime``: the public entry point. Loads a model, validates requests, drives a decoder, records traces.

``stream()`` is the one decode loop; ``generate()`` drains it. Both accept a str prompt (tokenised with
the checkpoint's tokenizer) or a list of token ids.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import ABSURD_MAX_NEW_TOKENS, MODES, EarlyExitConfig, SamplingConfig, vocab_exit_fits
from .costs import CostModel
from .decoding import Decoder, FullDecoder, StepOutcome
from .early_exit import EarlyExitDecoder
from .draft_vocab import DRAFT_VOCAB_FILE, load_ranking, shortlist
from .host_costs import HostCosts, measure_head_rows
from .speculative import (CALIBRATED_PRIOR_WEIGHT, AcceptanceStats, DraftModelDrafter, RoundTimings,
                          SpeculationController, SpeculativeDecoder, single_threaded_ops)
from .errors import CheckpointError, ContextLengthError, InvalidRequestError
from .calibration import CERTIFICATE_FILE, PROJECTION_FILL, Certificate
from .exit_classifier import CLASSIFIER_FILE, ExitClassifier
from .exits import ADAPTER_FILE, ExitHeads, load_adapters
from .gating import GATE_FILE, PromptGate
from .kv_fill import KV_FILL_FILE, KVFill
from .datastore import DATASTORE_FILE, NgramStore
from .scheduler import AUTO_KNOBS, Plan, Scheduler
from .loading import LoadedCheckpoint, from_hf_model, load_checkpoint
from .model import LeanModel
from .sampling import Sampler
from .trace import GenerationResult, TokenTrace

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL_DIR = ASSETS_DIR / "pycoder-8l"
DEFAULTS_FILE = "adaptive_defaults.json"  # per-model defaults for mode knobs, written by calibration
EARLY_EXIT_KNOBS = ("threshold", "measure", "min_layer", "kv_policy", "exit_layers", "patience", "exit_vocab_size",
                    "vocab_exit", "vocab_exit_size", "threshold_offsets", "exit_adapters")
SAMPLING_KNOBS = ("top_k", "top_p")
SPECULATIVE_KNOBS = ("drafter", "draft_model", "draft_depth", "draft_length", "max_draft", "draft_vocab_size",
                     "datastore", "guess_drafts", "overlap")
# The draft head's shortlist (plus the prompt's tokens; emitted ones join it). 512: on the bench prompts
# (9 x 128 tokens, fixed depth 3 / 4, 8 drafts, no guesses) 2048 had 985 / 1040 drafts accepted, 1024
# 983 / 1039, 512 982 / 1038, 256 975 / 1027, the full vocabulary 990 / 1046. A draft pass of several
# rows is bound by arithmetic on a small CPU, not by memory, and a 2048-token head costs as much per row
# as a whole layer of the bundled model: with the adaptive controller 512 ran 1.54-1.61x full's tokens/s
# where 2048 ran 1.34-1.49x (same runs, same prompts).
DEFAULT_DRAFT_VOCAB_SIZE = 512


class GenerationStream:
    """Iterate to receive TokenTrace records as tokens are produced; ``result`` is set at the end."""

    def __init__(self, records: Iterator[TokenTrace]):
        self._records = records
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[TokenTrace]:
        self.result = yield from self._records


class Runtime:
    def __init__(self, loaded: LoadedCheckpoint, name: str = "", share_weights: bool = False):
        self.spec = loaded.spec
        # Owned weights get fused q/k/v and gate/up matrices (fewer ops per layer); shared ones stay as they are.
        self.model = LeanModel(loaded.spec, loaded.weights, fuse=not share_weights)
        self.tokenizer = loaded.tokenizer
        self.costs = CostModel.from_spec(loaded.spec)
        self.directory = loaded.directory
        self.name = name or (str(loaded.directory) if loaded.directory else loaded.spec.architecture)
        self.heads = ExitHeads(self.model)
        self.defaults: dict[str, dict[str, Any]] = {}
        self.draft_ranking: list[int] | None = None  # token ids by frequency, for the draft shortlist
        self.exit_classifier: ExitClassifier | None = None  # learned exit decisions (measure="classifier")
        self.certificate: Certificate | None = None  # Learn-then-Test certificate of an early-exit setting
        self.gate: PromptGate | None = None  # prompt-level gate: which path is enough for a prompt
        # corpus n-grams: lookup drafts and self-draft guesses where the context has no match
        self.datastore: NgramStore | None = None
        if loaded.directory is not None:
            self._load_sidecars(loaded.directory)
        self._host_costs: HostCosts | None = None
        self._draft_head_ms: dict[int, float] = {}
        self._draft_runtimes: dict[str, "Runtime"] = {}
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (token_text)
        priors = {int(k): float(v) for k, v in self.defaults.get("speculative", {}).get("acceptance_priors", {}).items()}
        # running acceptance, shared by every request; calibrated priors are measured, so they weigh more
        self.acceptance = AcceptanceStats(priors, CALIBRATED_PRIOR_WEIGHT)
        self.round_timings = RoundTimings()  # measured / predicted round costs, shared by every request
        self.scheduler = Scheduler(self)  # mode="auto": running costs and audits, shared by every request

    @property
    def paths(self) -> dict[str, int]:
        """The multi-scale paths over the same weights: name -> layers run."""
        L = self.spec.num_layers
        return {"light": max(1, L // 4), "standard": max(1, L // 2), "full": L}

    @property
    def draft_depths(self) -> tuple[int, ...]:
        """What self-drafting chooses from: a grid of at most five depths from the light path to three
        quarters of the layers (every depth on a small model), plus the standard path.

        A depth between the paths can draft better per unit of cost than either: on the bundled 8-layer
        model the exit after 3 layers agreed with full depth on 0.864 of calibration tokens when this was
        measured, nearly the 0.887 after 4, at three quarters of the draft cost, and adding it took
        self-speculation from 1.09-1.10x to 1.14x full's tokens/s in the benchmark (2 threads, 5 repeats).
        Depths past the standard path cost more a drafted token but leave fewer layers to verify and are
        accepted more often (the bundled model's prior after 6 layers is 0.952, after 4 0.913), and with
        checked guesses a pass drafts ~2.4 tokens, so a draft's extra layers are paid less than once a
        token: letting the controller also choose 5 and 6 made self-speculation 1.046x as fast as choosing
        among 2-4 on average (median 1.031x, faster in 19 of 30 runs, each two runtimes in one process
        interleaved per prompt over 3 repeats of the bench prompts). A small gain here, with a wide spread."""
        L = self.spec.num_layers
        if L < 2:
            return ()  # no shallow path to draft with
        light, standard = self.paths["light"], self.paths["standard"]  # both below L once L >= 2
        deep = max(standard, 3 * L // 4)  # below L too
        step = max(1, -(-(deep - light) // 4))  # ceil: at most 6 depths, whatever the model's size
        return tuple(sorted({*range(light, deep, step), standard, deep}))

    def host_costs(self) -> HostCosts:
        """Per-layer and head wall times on this host, measured once on first use."""
        if self._host_costs is None:
            self._host_costs = HostCosts.measure(self.model)
        return self._host_costs

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False) -> "Runtime":
        """No argument: the bundled default model, offline. Otherwise a local directory or a hub id."""
        if path is None:
            if not (DEFAULT_MODEL_DIR / "config.json").is_file():
                raise CheckpointError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR}; "
                                      "train it with `python -m adaptive train-model` or pass a model path")
            path = DEFAULT_MODEL_DIR
        return cls(load_checkpoint(str(path), dtype=dtype, trust_remote_code=trust_remote_code))

    @classmethod
    def from_model(cls, hf_model, tokenizer=None, share_weights: bool = True) -> "Runtime":
        """Wrap an in-memory transformers model. Its weights are shared, not copied, unless
        ``share_weights=False``, which trades a copy of the q/k/v and gate/up weights for speed."""
        return cls(from_hf_model(hf_model, tokenizer), share_weights=share_weights)

    def draft_head_ms(self, rows: int) -> float:
        """Measured cost of a draft head over ``rows`` vocabulary rows (cached per 256 rows)."""
        key = -(-rows // 256) * 256
        if key not in self._draft_head_ms:
            self._draft_head_ms[key] = measure_head_rows(self.model, min(key, self.spec.vocab_size))
        return self._draft_head_ms[key]

    def _load_sidecars(self, directory: Path) -> None:
        adapter_path = directory / ADAPTER_FILE
        if adapter_path.is_file():
            self.heads = ExitHeads(self.model, load_adapters(adapter_path, self.spec.hidden_size,
                                                              self.spec.num_layers, self.model.dtype))
            self.heads.source = f"adapters ({adapter_path.name})"
        if (directory / CLASSIFIER_FILE).is_file():
            self.exit_classifier = ExitClassifier.load(directory / CLASSIFIER_FILE, self.spec.hidden_size,
                                                       self.spec.num_layers)
        if (directory / KV_FILL_FILE).is_file():
            spec = self.spec
            self.model.set_kv_fill(KVFill.load(directory / KV_FILL_FILE, spec.hidden_size, spec.num_layers,
                                               spec.num_kv_heads * spec.head_dim))
        if (directory / DATASTORE_FILE).is_file():
            self.datastore = NgramStore.load(directory / DATASTORE_FILE, self.spec.vocab_size)
        if (directory / GATE_FILE).is_file():
            self.gate = PromptGate.load(directory / GATE_FILE, self.spec.hidden_size, self.paths)
        if (directory / CERTIFICATE_FILE).is_file():
            cert = Certificate.load(directory / CERTIFICATE_FILE)
            if cert.kv_policy == "propagate" and cert.kv_fill != self.kv_fill_source():
                # Certified with other K/V fill maps (or none): this model decodes differently, so the
                # guarantee does not carry over; neither requests nor the scheduler may rely on it.
                warnings.warn(f"{directory / CERTIFICATE_FILE} was certified with K/V fill '{cert.kv_fill}', but this "
                              f"model fills with '{self.kv_fill_source()}': the certificate is ignored")
            else:
                self.certificate = cert
        if (directory / DRAFT_VOCAB_FILE).is_file():
            self.draft_ranking = load_ranking(directory / DRAFT_VOCAB_FILE, self.spec.vocab_size)
        defaults_path = directory / DEFAULTS_FILE
        if defaults_path.is_file():
            try:
                defaults = json.loads(defaults_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{defaults_path} is not valid JSON: {e}") from e
            if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
                raise CheckpointError(f"{defaults_path} must map a mode name to an object of knobs")
            self.defaults = defaults

    # ---- requests -----------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("the prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass the prompt as a list of token ids")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError("a token-id prompt must be a list of integers")
            bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})")
        else:
            raise InvalidRequestError(f"the prompt must be a str or a list of token ids, not {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None and token_ids else ""

    def token_text(self, token_id: int) -> str:
        """``decode([token_id])``, remembered per id: every trace carries its token's text (a tokenizer
        call, 1.6 us a token on the bundled model, against 0.2 us for the lookup: a small saving)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id])
        return text

    def _check_lengths(self, prompt_len: int, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise InvalidRequestError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if max_new_tokens > ABSURD_MAX_NEW_TOKENS:
            raise InvalidRequestError(f"max_new_tokens={max_new_tokens} is absurdly large (limit {ABSURD_MAX_NEW_TOKENS})")
        context = self.spec.max_positions
        if prompt_len >= context:
            raise ContextLengthError(f"the prompt has {prompt_len} tokens but the model's context is {context}")
        if prompt_len + max_new_tokens > context:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                f"{context}; use max_new_tokens <= {context - prompt_len}")

    def early_exit_config(self, **knobs) -> EarlyExitConfig:
        merged = {**self.defaults.get("early_exit", {}), **knobs}
        merged = {k: v for k, v in merged.items() if k in EARLY_EXIT_KNOBS}
        measure = merged.get("measure", EarlyExitConfig.measure)
        if "vocab_exit" not in knobs and merged.get("vocab_exit") is not None and \
                not vocab_exit_fits(measure, merged.get("exit_vocab_size", EarlyExitConfig.exit_vocab_size),
                                    merged.get("vocab_exit_size", EarlyExitConfig.vocab_exit_size)):
            # The model's default vocabulary exit does not fit the measure / shortlist this request chose:
            # drop it rather than fail on a knob the caller never set.
            merged.pop("vocab_exit")
        if isinstance(merged.get("exit_layers"), list):
            merged["exit_layers"] = tuple(merged["exit_layers"])
        return EarlyExitConfig(num_layers=self.spec.num_layers, **merged)

    def _speculative_decoder(self, options: dict[str, Any], max_len: int, sampler: Sampler, eos: set[int],
                             prompt_ids: list[int]) -> tuple[Decoder, dict[str, Any]]:
        knobs = {**self.defaults.get("speculative", {}), **options}
        drafter = knobs.get("drafter", "self")
        L = self.spec.num_layers
        depth, length = knobs.get("draft_depth"), knobs.get("draft_length")
        max_draft = knobs.get("max_draft", 8)
        if depth is not None and (not isinstance(depth, int) or not 1 <= depth < L):
            raise InvalidRequestError(f"draft_depth must be an integer in [1, {L - 1}], got {depth!r}")
        if length is not None and (not isinstance(length, int) or not 1 <= length <= 64):
            raise InvalidRequestError(f"draft_length must be an integer in [1, 64], got {length!r}")
        if not isinstance(max_draft, int) or not 1 <= max_draft <= 64:
            raise InvalidRequestError(f"max_draft must be an integer in [1, 64], got {max_draft!r}")
        draft_model, draft_step_ms = None, None
        if drafter == "draft_model":
            path = knobs.get("draft_model")
            if not path:
                raise InvalidRequestError("drafter='draft_model' needs draft_model= (a checkpoint path)")
            draft_rt = self._draft_runtime(str(path))
            draft_model = DraftModelDrafter(draft_rt.model, draft_rt.costs, max_len)
            draft_step_ms = draft_rt.host_costs().full_step()
            depth = 0
        elif drafter not in ("self", "lookup"):
            raise InvalidRequestError(f"unknown drafter {drafter!r}; choose one of self, lookup, draft_model")
        vocab_size = knobs.get("draft_vocab_size", DEFAULT_DRAFT_VOCAB_SIZE)
        if not isinstance(vocab_size, int) or vocab_size < 0:
            raise InvalidRequestError(f"draft_vocab_size must be an integer >= 0 (0 = full vocabulary), got {vocab_size!r}")
        draft_ids = self._shortlist(vocab_size, prompt_ids)
        draft_head_ms = self.draft_head_ms(int(draft_ids.numel())) if draft_ids is not None else None
        guess_drafts = knobs.get("guess_drafts", True)  # see README, "Guessed drafts"
        if not isinstance(guess_drafts, bool):
            raise InvalidRequestError(f"guess_drafts must be true or false, got {guess_drafts!r}")
        guessing = guess_drafts and sampler.config.greedy  # a sampled pass draws one token: nothing to guess
        controller = SpeculationController(self.host_costs(), L, self.acceptance, self.draft_depths, max_draft=max_draft,
                                           fixed_depth=depth, fixed_length=length, draft_model_step_ms=draft_step_ms,
                                           draft_head_ms=draft_head_ms, timings=self.round_timings,
                                           draft_variant="guess" if guessing else "")
        overlap = knobs.get("overlap", False)  # off by default: see README, "Overlapped verification"
        if not isinstance(overlap, bool):
            raise InvalidRequestError(f"overlap must be true or false, got {overlap!r}")
        use_store = knobs.get("datastore", True)
        if not isinstance(use_store, bool):
            raise InvalidRequestError(f"datastore must be true or false, got {use_store!r}")
        # lookup drafts from the corpus where the prompt has no match; greedy self drafts that guess, likewise
        datastore = self.datastore if use_store and (drafter == "lookup" or drafter == "self" and guessing) else None
        decoder = SpeculativeDecoder(self.model, self.costs, max_len, self.heads, controller, sampler, drafter, eos,
                                     draft_model=draft_model, draft_ids=draft_ids, datastore=datastore,
                                     guess_drafts=guess_drafts, overlap=overlap)
        settings = {"drafter": drafter, "draft_depth": depth if depth is not None else "adaptive",
                    "draft_length": length if length is not None else "adaptive", "max_draft": max_draft,
                    "draft_vocab": int(draft_ids.numel()) if draft_ids is not None else self.spec.vocab_size,
                    "guess_drafts": guessing,
                    "overlap": decoder.overlap,
                    "exit_heads": self.heads.source,
                    "datastore": f"{len(datastore)} 3-grams ({datastore.source})" if datastore is not None else None}
        return decoder, settings

    def _draft_runtime(self, path: str) -> "Runtime":
        if path not in self._draft_runtimes:
            draft = Runtime.from_pretrained(path)
            if draft.spec.vocab_size != self.spec.vocab_size:
                raise InvalidRequestError(f"the draft model's vocabulary ({draft.spec.vocab_size}) differs from "
                                          f"the target's ({self.spec.vocab_size})")
            if self.tokenizer is not None and draft.tokenizer is not None and \
                    draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise InvalidRequestError("the draft model's tokenizer differs from the target's")
            self._draft_runtimes[path] = draft
        return self._draft_runtimes[path]

    def _decoder(self, mode: str, options: dict[str, Any], max_len: int, sampler: Sampler,
                 eos: set[int], prompt_ids: list[int]) -> tuple[Decoder, dict[str, Any]]:
        allowed = {"full": ("path", "kv_policy", "exit_vocab_size"), "early_exit": EARLY_EXIT_KNOBS,
                   "speculative": SPECULATIVE_KNOBS}
        if mode not in MODES:
            raise InvalidRequestError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        general = (*SAMPLING_KNOBS, "stop_at_eos", "follow")
        unknown = set(options) - set(allowed[mode]) - set(general)
        if unknown:
            raise InvalidRequestError(f"unknown option(s) {sorted(unknown)} for mode={mode!r}; "
                                      f"valid: {', '.join([*allowed[mode], *general])}")
        if "follow" in options and mode == "speculative":
            raise InvalidRequestError("follow= (teacher forcing) applies to mode='full' and 'early_exit' only")
        if mode == "full":
            path = options.get("path", "full")
            if path not in self.paths:
                raise InvalidRequestError(f"unknown path {path!r}; choose one of {', '.join(self.paths)}")
            if path == "full":
                return FullDecoder(self.model, self.costs, max_len), {"multiscale_path": "full"}
            # A fixed shallow path is early exit that always stops after the path's layers: no confidence
            # check is needed (a hidden-state measure at threshold 0), the exit head runs once per token.
            depth = self.paths[path]
            cfg = EarlyExitConfig(threshold=0.0, measure="cosine", exit_layers=(depth,), min_layer=1,
                                  kv_policy=options.get("kv_policy", "propagate"),
                                  exit_vocab_size=options.get("exit_vocab_size", 0), num_layers=self.spec.num_layers)
            exit_ids = self._shortlist(cfg.exit_vocab_size, prompt_ids)
            return EarlyExitDecoder(self.model, self.costs, max_len, self.heads, cfg, exit_ids), {
                "multiscale_path": path, "path_layers": depth, "kv_policy": cfg.kv_policy, "exit_heads": self.heads.source,
                "exit_vocab": int(exit_ids.numel()) if exit_ids is not None else self.spec.vocab_size}
        if mode == "speculative":
            return self._speculative_decoder({k: v for k, v in options.items() if k in SPECULATIVE_KNOBS},
                                             max_len, sampler, eos, prompt_ids)
        cfg = self.early_exit_config(**{k: v for k, v in options.items() if k in EARLY_EXIT_KNOBS})
        exit_ids = self._shortlist(cfg.exit_vocab_size, prompt_ids)
        vocab_ids = (self._shortlist(cfg.vocab_exit_size, prompt_ids)
                     if cfg.vocab_exit is not None and cfg.vocab_exit_size else None)
        heads = self.heads.for_request(cfg.exit_adapters)
        settings = {"threshold": cfg.threshold, "measure": cfg.measure, "min_layer": cfg.min_layer,
                    "kv_policy": cfg.kv_policy, "exit_layers": sorted(cfg.exit_points(self.spec.num_layers)),
                    "exit_heads": heads.source, "exit_adapters": cfg.exit_adapters,
                    "exit_vocab": int(exit_ids.numel()) if exit_ids is not None else self.spec.vocab_size,
                    "exit_vocab_size": cfg.exit_vocab_size, "vocab_exit": cfg.vocab_exit,
                    "vocab_exit_size": cfg.vocab_exit_size, "threshold_offsets": cfg.offsets_dict(),
                    "kv_fill": self.kv_fill_source() if cfg.kv_policy == "propagate" else None}
        # which Learn-then-Test certificate, if any, covers exactly these settings
        in_force = self.certificate is not None and self.certificate.covers(settings)
        settings["certificate"] = self.certificate.summary() if in_force else None
        return EarlyExitDecoder(self.model, self.costs, max_len, heads, cfg, exit_ids,
                                self.exit_classifier, vocab_ids), settings

    def kv_fill_source(self) -> str:
        """How ``propagate`` fills skipped layers' K/V on this model (shown in stats and the app)."""
        fill = self.model.kv_fill
        return PROJECTION_FILL if fill is None else f"learned maps ({KV_FILL_FILE}, {fill.digest})"

    def _shortlist(self, size: int, prompt_ids: list[int]) -> torch.Tensor | None:
        """Ids of the ``size`` most frequent tokens plus the prompt's, or None (full vocabulary)."""
        if not self.draft_ranking or not 0 < size < self.spec.vocab_size:
            return None
        return shortlist(self.draft_ranking, size, prompt_ids, self.model.device)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, mode: str = "full",
               temperature: float = 0.0, seed: int | None = None, **options) -> GenerationStream:
        """Validate everything up front, then return an iterator of TokenTrace records."""
        prompt_ids = self.encode(prompt)
        self._check_lengths(len(prompt_ids), max_new_tokens)
        plan: Plan | None = None
        if mode == "auto":
            unknown = set(options) - set(AUTO_KNOBS) - {*SAMPLING_KNOBS, "stop_at_eos"}
            if unknown:
                raise InvalidRequestError(f"unknown option(s) {sorted(unknown)} for mode='auto'; valid: "
                                          f"{', '.join([*AUTO_KNOBS, *SAMPLING_KNOBS, 'stop_at_eos'])}")
            plan = self.scheduler.plan(prompt_ids, {k: v for k, v in options.items() if k in AUTO_KNOBS}, max_new_tokens)
            options = {**{k: v for k, v in options.items() if k not in AUTO_KNOBS}, **plan.options}
            mode = plan.mode
        sampling = SamplingConfig(temperature=temperature, seed=seed, top_k=options.get("top_k", 0),
                                  top_p=options.get("top_p", 1.0))
        eos = set(self.spec.eos_token_ids) if options.get("stop_at_eos", True) else set()
        sampler = Sampler(sampling, self.model.device)
        decoder, settings = self._decoder(mode, options, len(prompt_ids) + max_new_tokens, sampler, eos, prompt_ids)
        prompt_text = prompt if isinstance(prompt, str) else self.decode(prompt_ids)
        follow = options.get("follow")
        if follow is not None:
            if not isinstance(follow, (list, tuple)) or not all(isinstance(t, int) and 0 <= t < self.spec.vocab_size for t in follow):
                raise InvalidRequestError("follow must be a list of token ids")
            if len(follow) < max_new_tokens:
                raise InvalidRequestError(f"follow has {len(follow)} tokens but max_new_tokens={max_new_tokens}")
        records = self._records(prompt_ids, prompt_text, max_new_tokens, mode, sampler, decoder, settings, eos,
                                follow)
        return GenerationStream(records if plan is None else self._auto_records(records, plan))

    def _auto_records(self, records, plan: Plan):
        """Pass the chosen mode's records through, then charge the scheduling work to the request and
        feed the measured cost (and, when drawn, a full-depth audit) back to the scheduler."""
        # Every token carries the gate's per-path probabilities (the prompt gate decides per request).
        gate = {**plan.gate["probabilities"]} if plan.gate else None
        while True:
            try:
                trace = next(records)
            except StopIteration as done:
                result = done.value
                break
            trace.gate = gate
            yield trace
        self.scheduler.observe(plan, result)
        st = result.stats
        gate_macs = plan.gate["feature_macs"] if plan.gate else 0
        audit_macs = plan.audit["macs"] if plan.audit else 0
        audit_ms = plan.audit["ms"] if plan.audit else 0.0
        st["served_by"] = st["mode"]
        st["mode"] = "auto"
        st["auto"] = plan.to_dict()
        # Honest totals: the gate's pass is part of what this request cost; a drawn audit (a monitoring
        # cost that serves later requests, paid by ~audit_rate of them) is reported beside it.
        st["decode_compute_fraction"] = st["compute_fraction"]
        st["compute_fraction"] = (st["macs"] + gate_macs) / st["full_macs"]
        st["audit_compute_fraction"] = audit_macs / st["full_macs"]
        st["scheduling_ms"] = plan.plan_ms + audit_ms
        st["total_ms"] += plan.plan_ms + audit_ms
        st["ms_per_token"] = st["total_ms"] / max(1, st["new_tokens"])
        return result

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, mode: str = "full",
                 temperature: float = 0.0, seed: int | None = None, **options) -> GenerationResult:
        stream = self.stream(prompt, max_new_tokens, mode, temperature, seed, **options)
        for _ in stream:
            pass
        return stream.result

    def _encode_requests(self, prompts, max_new_tokens: int, caller: str) -> list[list[int]]:
        """Token ids of several prompts, every one validated before any work starts."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidRequestError(f"{caller} needs a non-empty list of prompts")
        encoded = [self.encode(p) for p in prompts]
        for ids in encoded:
            self._check_lengths(len(ids), max_new_tokens)
        return encoded

    def generate_batch(self, prompts: list[str | list[int]], max_new_tokens: int = 64,
                       stop_at_eos: bool = True) -> list[GenerationResult]:
        """Greedy full-depth decoding of several prompts as one batch: one pass per step for all rows.

        Prompts are left-padded to the longest; each row's RoPE positions start at its first real token
        and a mask keeps every real query off the pad slots, so each row computes what it would alone
        (tests pin it to one-by-one ``mode="full"``). Rows that stop at EOS ride along idle until all have
        stopped. The pad slots and idle rows are real work: ``stats["batch"]`` reports them, and each
        row's ``compute_fraction`` includes its share of the pass (padding included).
        """
        encoded = self._encode_requests(prompts, max_new_tokens, "generate_batch")
        model, costs, L = self.model, self.costs, self.spec.num_layers
        B, P = len(encoded), max(len(ids) for ids in encoded)
        pads = torch.tensor([P - len(ids) for ids in encoded], device=model.device)
        eos = set(self.spec.eos_token_ids) if stop_at_eos else set()
        # any valid id fills the pad slots: they are masked for every real query
        rows = torch.tensor([[0] * (P - len(ids)) + ids for ids in encoded], device=model.device)  # (B, P)
        tokens: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        start = time.perf_counter()
        with torch.inference_mode():
            cache = model.new_cache(B, P + max_new_tokens)
            h = model.run_layers(model.embed_rows(rows, 0, pads), 0, L, 0, cache, pads)
            logits = model.head(h[:, -1])  # (B, V)
            slot, steps = P, 0
            while True:
                picks = logits.argmax(-1).tolist()
                for r in range(B):
                    if not done[r]:
                        tokens[r].append(picks[r])
                        done[r] = picks[r] in eos or len(tokens[r]) >= max_new_tokens
                if all(done):
                    break
                x = model.embed_rows(torch.tensor(picks, device=model.device)[:, None], slot, pads)  # (B, 1, d)
                logits = model.head(model.run_layers(x, 0, L, slot, cache, pads)[:, -1])
                slot, steps = slot + 1, steps + 1
        total_s = time.perf_counter() - start
        # Work actually done: every row at every slot of the prefill and of each step (pads, idle rows).
        spent = B * (costs.prefill_macs(P) + sum(costs.full_token_macs(p) for p in range(P, P + steps)))
        useful = sum(sum(costs.full_token_macs(p) for p in range(len(ids) - 1, len(ids) - 1 + len(out)))
                     for ids, out in zip(encoded, tokens))
        results = []
        for r, (ids, out) in enumerate(zip(encoded, tokens)):
            traces = []
            for i, t in enumerate(out):
                macs = costs.full_token_macs(len(ids) - 1 + i)  # the row's own position: no padding in it
                traces.append(TokenTrace(token_id=t, position=len(ids) + i, exit_layer=L, text=self.token_text(t),
                                         macs=macs, full_macs=macs))
            full = sum(t.full_macs for t in traces)
            stats = {"mode": "full", "model": self.name, "num_layers": L, "prompt_tokens": len(ids),
                     "new_tokens": len(out), "layers_run_mean": float(L),
                     "compute_fraction": (spent / useful) if useful else 1.0,  # each row's share of the batch's work
                     "tokens_per_s": len(out) / total_s, "ms_per_token": 1000 * total_s / max(1, len(out)),
                     "total_ms": 1000 * total_s, "macs": full, "full_macs": full, "max_new_tokens": max_new_tokens,
                     "temperature": 0.0, "multiscale_path": "full",
                     "batch": {"size": B, "index": r, "padded_length": P, "pad_slots": int(pads.sum()),
                               "steps": steps + 1, "batch_macs": spent, "useful_macs": useful,
                               "batch_tokens_per_s": sum(len(o) for o in tokens) / total_s}}
            stop = "eos" if out and out[-1] in eos else "max_new_tokens"
            results.append(GenerationResult(token_ids=out, text=self.decode(out), traces=traces, stats=stats,
                                            prompt_ids=ids, prompt_text=prompts[r] if isinstance(prompts[r], str) else self.decode(ids),
                                            stop_reason=stop))
        return results

    def generate_many(self, prompts: list[str | list[int]], max_new_tokens: int = 64, mode: str = "full",
                      order: str = "cheap_first", batch_size: int = 1, **options) -> list[GenerationResult]:
        """Several requests in one call, served cheapest-predicted first; results in the input order.

        The predicted cost of a request is its prompt length plus ``max_new_tokens`` times the depth the
        prompt gate expects it to need (full depth without a gate), so short, easy requests are not held
        back behind deep ones. With ``mode="auto"`` and ``policy="load"`` each request sees the number of
        requests still waiting as its queue depth. Rows are decoded one after another with the batch-1
        kernels (each row keeps its own cache, so one row's exits can never touch another's); every
        result records its queue wait and position in ``stats["batch"]``. With greedy ``mode="full"``
        and ``batch_size > 1``, consecutive requests of the schedule (so: of similar predicted cost)
        are decoded together by ``generate_batch``.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > 1 and (mode != "full" or set(options) - {"stop_at_eos"}):
            raise InvalidRequestError("batch_size > 1 batches greedy mode='full' only (no other options)")
        if order not in ("cheap_first", "fifo"):
            raise InvalidRequestError(f"order must be 'cheap_first' or 'fifo', got {order!r}")
        encoded = self._encode_requests(prompts, max_new_tokens, "generate_many")
        L = self.spec.num_layers
        predicted = []
        for ids in encoded:
            depth = L
            if self.gate is not None:
                depth = self.paths[self.gate.decide(self, ids).path]
            predicted.append(len(ids) + max_new_tokens * depth / L)
        schedule = sorted(range(len(encoded)), key=lambda i: predicted[i]) if order == "cheap_first" \
            else list(range(len(encoded)))
        results: list[GenerationResult | None] = [None] * len(encoded)
        start = time.perf_counter()
        if batch_size > 1:
            for first in range(0, len(schedule), batch_size):
                group = schedule[first:first + batch_size]
                waited_ms = (time.perf_counter() - start) * 1000
                outs = self.generate_batch([encoded[i] for i in group], max_new_tokens,
                                           stop_at_eos=options.get("stop_at_eos", True))
                for rank, (i, res) in enumerate(zip(group, outs), start=first):
                    res.stats["batch"].update({"index": i, "served_as": rank, "order": order, "predicted_cost": predicted[i],
                                               "queue_wait_ms": waited_ms, "latency_ms": waited_ms + res.stats["total_ms"]})
                    results[i] = res
            return results
        for rank, i in enumerate(schedule):
            waited_ms = (time.perf_counter() - start) * 1000
            row_options = dict(options)
            if mode == "auto" and row_options.get("policy") == "load" and "queue_depth" not in options:
                row_options["queue_depth"] = len(schedule) - rank - 1
            prompt = prompts[i] if isinstance(prompts[i], str) else encoded[i]
            res = self.generate(prompt, max_new_tokens=max_new_tokens, mode=mode, **row_options)
            res.stats["batch"] = {"index": i, "served_as": rank, "size": len(encoded), "order": order,
                                  "predicted_cost": predicted[i], "queue_wait_ms": waited_ms,
                                  "latency_ms": waited_ms + res.stats["total_ms"]}
            results[i] = res
        return results

    # ---- the decode loop ----------------------------------------------------------------------------
    def _records(self, prompt_ids: list[int], prompt_text: str, max_new_tokens: int, mode: str,
                 sampler: Sampler, decoder: Decoder, settings: dict[str, Any], eos: set[int],
                 follow: list[int] | None = None):
        """The decode loop. With ``follow`` (teacher forcing) each step still records the token this mode
        would have chosen, but feeds ``follow``'s token instead, so per-token agreement with a reference
        is measured on the same prefixes (free-running outputs diverge after the first disagreement)."""
        traces: list[TokenTrace] = []
        with torch.inference_mode():
            start = time.perf_counter()
            outcome: StepOutcome = decoder.prefill(torch.tensor([prompt_ids], device=self.model.device))
            # The first new token's share of the prefill: its own position at full depth.
            outcome.macs = outcome.full_macs = self.costs.full_token_macs(len(prompt_ids) - 1)
            prefill_s = time.perf_counter() - start
            last = time.perf_counter()
            stop_reason = "max_new_tokens"
            while True:
                token = sampler.sample(outcome.logits)
                now = time.perf_counter()
                trace = TokenTrace(
                    token_id=token, position=decoder.pos, exit_layer=outcome.exit_layer,
                    confidence=outcome.confidence, text=self.token_text(token),
                    layer_confidence=outcome.layer_confidence, layer_top1=outcome.layer_top1,
                    kv_fill_layers=outcome.kv_fill_layers, deferred_positions=outcome.deferred_positions,
                    full_head_skipped=outcome.full_head_skipped, macs=outcome.macs, full_macs=outcome.full_macs,
                    elapsed_ms=(now - last) * 1000)
                last = now
                traces.append(trace)
                yield trace
                if follow is not None:  # teacher forcing: the reference decides what is fed and when to stop
                    token = follow[len(traces) - 1]
                if token in eos:
                    stop_reason = "eos"
                    break
                if len(traces) >= max_new_tokens:
                    break
                if isinstance(decoder, SpeculativeDecoder):
                    stop_reason = yield from self._speculative_records(decoder, token, max_new_tokens, eos, traces)
                    break
                outcome = decoder.step(token)
            total_s = time.perf_counter() - start
        token_ids = [t.token_id for t in traces]
        stats = self._stats(traces, decoder, mode, settings, prefill_s, total_s, len(prompt_ids))
        # what a replay or an audit of this trace needs to know about the request itself
        stats.update({"max_new_tokens": max_new_tokens, "temperature": sampler.config.temperature,
                      "top_k": sampler.config.top_k, "top_p": sampler.config.top_p, "seed": sampler.config.seed,
                      "teacher_forced": follow is not None})
        stats["stop_reason"] = stop_reason
        rounds = decoder.rounds if isinstance(decoder, SpeculativeDecoder) else []
        if rounds:
            stats.update(_speculation_stats(rounds))
            stats["draft_vocab_added"] = decoder.draft_head.size - stats["draft_vocab"]  # emitted tokens that joined
        return GenerationResult(token_ids=token_ids, text=self.decode(token_ids), traces=traces, stats=stats,
                                prompt_ids=prompt_ids, prompt_text=prompt_text, stop_reason=stop_reason, rounds=rounds)

    def _speculative_records(self, decoder: SpeculativeDecoder, t0: int, max_new_tokens: int, eos: set[int],
                             traces: list[TokenTrace]):
        """Rounds of draft + verify after the first token; yields one TokenTrace per emitted token."""
        with single_threaded_ops() if decoder.overlap else contextlib.nullcontext():
            return (yield from self._rounds(decoder, t0, max_new_tokens, eos, traces))

    def _rounds(self, decoder: SpeculativeDecoder, t0: int, max_new_tokens: int, eos: set[int],
                traces: list[TokenTrace]):
        L = self.spec.num_layers
        last = time.perf_counter()
        while True:
            emitted, macs = decoder.round(t0, max_new_tokens - len(traces))
            round_index = len(decoder.rounds) - 1
            share = macs // len(emitted)  # the round's work, split evenly over the tokens it produced
            first_position = decoder.pos - len(emitted) + 1  # t0 sat at decoder.pos - len(emitted)
            for j, e in enumerate(emitted):
                now = time.perf_counter()
                trace = TokenTrace(token_id=e.token, position=first_position + j, exit_layer=L,
                                   text=self.token_text(e.token), drafted=e.source == "draft",
                                   accepted=True if e.source == "draft" else None, source=e.source,
                                   round=round_index, macs=share, elapsed_ms=(now - last) * 1000)
                last = now
                traces.append(trace)
                yield trace
                if e.token in eos:
                    return "eos"
                if len(traces) >= max_new_tokens:
                    return "max_new_tokens"
            t0 = emitted[-1].token

    def _stats(self, traces: list[TokenTrace], decoder: Decoder, mode: str, settings: dict[str, Any],
               prefill_s: float, total_s: float, prompt_len: int) -> dict[str, Any]:
        n, L = len(traces), self.spec.num_layers
        for t in traces:  # speculative traces get their full-depth reference here, by position
            if not t.full_macs:
                t.full_macs = self.costs.full_token_macs(t.position - 1)
        macs = sum(t.macs for t in traces)
        full = sum(t.full_macs for t in traces)
        totals = decoder.totals
        decode_s = max(total_s - prefill_s, 1e-9)
        # The breakdown by kind of work is kept by the step decoders; a speculative round's work is only
        # known as a whole (in compute_fraction and the rounds' draft/verify times).
        breakdown = {} if isinstance(decoder, SpeculativeDecoder) else {
            "kv_fill_fraction": totals.kv_fill_macs / full,
            "head_fraction": (totals.head_macs + self.costs.head_macs) / full}
        return {
            "mode": mode, "model": self.name, "num_layers": L, "prompt_tokens": prompt_len, "new_tokens": n,
            "layers_run_mean": sum(t.exit_layer for t in traces) / n,
            "compute_fraction": macs / full, **breakdown,
            "exit_layer_histogram": {str(k): v for k, v in sorted(Counter(t.exit_layer for t in traces).items())},
            "vocab_exits": sum(t.full_head_skipped for t in traces),  # full depth, full head skipped
            "tokens_per_s": n / total_s, "decode_tokens_per_s": (n - 1) / decode_s if n > 1 else 0.0,
            "ms_per_token": 1000 * total_s / n, "prefill_ms": 1000 * prefill_s, "total_ms": 1000 * total_s,
            "macs": macs, "full_macs": full, "prefill_macs": totals.prefill_macs,
            "layer_code": self.model.layer_backend(),  # "native" (the C++ loop) or "python (why)"
            **settings,
        }


def _speculation_stats(rounds) -> dict[str, Any]:
    """Acceptance per draft position, accepted tokens per round, verifier passes."""
    drafted_rounds = [r for r in rounds if r.drafted]
    by_position: list[list[int]] = []  # position -> [accepted, judged]
    for r in drafted_rounds:
        for j in range(r.judged):
            while len(by_position) <= j:
                by_position.append([0, 0])
            by_position[j][0] += j < r.accepted
            by_position[j][1] += 1
    judged = sum(b[1] for b in by_position)
    return {
        "verifier_passes": len(rounds),
        "speculative_rounds": len(drafted_rounds),
        "plain_steps": len(rounds) - len(drafted_rounds),
        "acceptance_rate": sum(b[0] for b in by_position) / judged if judged else 0.0,
        "acceptance_by_position": [a / t for a, t in by_position],
        "mean_accepted_per_round": sum(r.accepted for r in drafted_rounds) / len(drafted_rounds) if drafted_rounds else 0.0,
        "mean_drafted_per_round": sum(len(r.drafted) for r in drafted_rounds) / len(drafted_rounds) if drafted_rounds else 0.0,
        "draft_depth_histogram": {str(k): v for k, v in sorted(Counter(r.depth for r in drafted_rounds).items())},
        "drafter_histogram": dict(Counter(r.drafter for r in rounds)),
        "draft_ms": sum(r.draft_ms for r in rounds), "verify_ms": sum(r.verify_ms for r in rounds),
    }
