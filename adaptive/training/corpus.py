"""The training corpus of the bundled default model: the Python standard library's own source.

Why this corpus: it ships with every interpreter, so training needs no network, and it is real,
varied Python (library code, tests, docs in docstrings) under the PSF licence.

What is in it: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` of the running
interpreter, tests included, but nothing below a ``site-packages`` or ``dist-packages`` folder
(third-party code is not part of the stdlib and differs between machines).

Split rule (deterministic, independent of file order and of which other files exist):
    bucket = int(sha256(relpath.encode("utf-8")).hexdigest(), 16) % 100
    bucket <  90 -> "train";  90 <= bucket < 95 -> "validation";  95 <= bucket -> "test"
where ``relpath`` is the file's path relative to the stdlib root with "/" separators
(e.g. ``"json/decoder.py"``). Files are decoded as UTF-8; files that fail are skipped and counted.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SPLITS = ("train", "validation", "test")
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def split_of(relpath: str) -> str:
    """The split a file belongs to; see the module docstring for the rule."""
    bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < 90:
        return "train"
    if bucket < 95:
        return "validation"
    return "test"


@dataclass
class SplitListing:
    """Files of one split, as paths relative to ``root`` (sorted, "/"-separated)."""

    split: str
    root: Path
    relpaths: list[str] = field(default_factory=list)


def _all_relpaths(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into third-party or cache folders.
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def list_split(split: str, root: Path | None = None) -> SplitListing:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root) if root is not None else stdlib_root()
    return SplitListing(split, root, [p for p in _all_relpaths(root) if split_of(p) == split])


@dataclass
class Document:
    relpath: str
    text: str


@dataclass
class DecodeStats:
    """Counts filled in while iterating; files that are not valid UTF-8 are skipped, not fatal."""

    ok: int = 0
    skipped: int = 0
    skipped_paths: list[str] = field(default_factory=list)


def iter_documents(split: str, root: Path | None = None,
                   stats: DecodeStats | None = None) -> Iterator[Document]:
    listing = list_split(split, root)
    for rel in listing.relpaths:
        try:
            text = (listing.root / rel).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            if stats is not None:
                stats.skipped += 1
                stats.skipped_paths.append(rel)
            continue
        if stats is not None:
            stats.ok += 1
        yield Document(rel, text)


def corpus_fingerprint(split: str, root: Path | None = None) -> str:
    """sha256 over (relpath, size, content hash) of a split: a cache key that changes with the files."""
    listing = list_split(split, root)
    h = hashlib.sha256()
    for rel in listing.relpaths:
        data = (listing.root / rel).read_bytes()
        h.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()
