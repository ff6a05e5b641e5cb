"""``python -m adaptive build-datastore``: the n-gram datastore that lookup drafting falls back to.

Counts every 3-gram of a corpus with its next token and keeps, for 3-grams seen at least
``--min-count`` times, the most frequent next token when it follows at least ``--min-share`` of the
time (see ``adaptive/datastore.py``). Corpus: the stdlib train split (default) or local text files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..datastore import DATASTORE_FILE, MIN_SHARE, NgramStore
from ..runtime import Runtime


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--text", nargs="*", default=None, help="local UTF-8 text files (default: the stdlib train split)")
    p.add_argument("--min-count", type=int, default=3)
    p.add_argument("--min-share", type=float, default=MIN_SHARE)
    p.add_argument("--out", default=None, help=f"output file (default: MODEL/{DATASTORE_FILE})")


def main(args: argparse.Namespace) -> int:
    start = time.time()
    rt = Runtime.from_pretrained(args.model)
    if rt.tokenizer is None:
        raise SystemExit("error: the model has no tokenizer")
    if args.text:
        ids: list[int] = []
        for path in args.text:
            ids.extend(rt.tokenizer.encode(Path(path).read_text(encoding="utf-8"), add_special_tokens=False))
        source = f"{len(args.text)} text file(s)"
    else:
        from .ltt_calibrate import _stream

        ids = _stream(rt, "train", None)
        source = "stdlib train split"
    store = NgramStore.build(np.asarray(ids), rt.spec.vocab_size, args.min_count, args.min_share,
                             source=f"{source}, {len(ids)} tokens, min_count {args.min_count}, min_share {args.min_share}")
    out = Path(args.out) if args.out else Path(rt.directory) / DATASTORE_FILE
    store.save(out)
    print(f"wrote {out}: {len(store)} 3-grams from {len(ids)} tokens in {time.time() - start:.1f} s")
    return 0
