"""Byte-level text corpora, split deterministically and cached as memory-mapped arrays.

The built-in default is the source of the running interpreter's standard library (test folders and
installed packages excluded): always present, real, and identical on every machine with the same
Python. Any text file or folder works too (``DataConfig.source``).

Splits are by file path, not by random draw: a file's split is fixed by the SHA-1 of its relative
path, so adding a file never moves another one between train and validation. When a source has too
few files for every split to get one (a single file, a small folder), each split is instead a
contiguous stretch of the concatenated text: train first, then validation, then test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from condcomp.data.domains import domain_path, is_domain
from condcomp.data.errors import DataError

SPLITS = ("train", "val", "test")
_FORMAT_VERSION = 1
# Folders under the stdlib that are not the library itself: tests and installed third-party code.
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_BINARY_SNIFF_BYTES = 8192


@dataclass
class Corpus:
    """Token arrays (memory-mapped) of each split, and where they came from.

    Byte-level (``tokenizer == "bytes"``): uint8 arrays, one token per byte, ``token_bytes`` None.
    Tokenized (``condcomp.data.tokenized``): token ids, and ``token_bytes[split]`` [n] the UTF-8
    bytes of text each token stands for (bits per byte divide by their sum).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    description: str
    num_files: int
    token_bytes: dict[str, np.ndarray] | None = None
    tokenizer: str = "bytes"
    skipped: int = 0  # files of a folder that were left out (binary, or links out of the folder)

    def bytes_of(self, name: str) -> np.ndarray | None:
        """Bytes per token of a split, or None for a byte-level corpus (one each)."""
        return None if self.token_bytes is None else self.token_bytes[name]

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _looks_binary(path: Path) -> str | None:
    """Return why ``path`` is not UTF-8 text, or None if it is."""
    with open(path, "rb") as fh:
        head = fh.read(_BINARY_SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        return f"it contains a NUL byte at offset {nul}"
    try:
        # Cut at the last newline so a multi-byte character split by the sniff window is not blamed.
        cut = head.rfind(b"\n")
        (head[: cut + 1] if cut >= 0 and len(head) == _BINARY_SNIFF_BYTES else head).decode("utf-8")
    except UnicodeDecodeError as e:
        return f"it is not UTF-8 text (invalid byte at offset {e.start})"
    return None


def _user_files(source: Path) -> tuple[list[Path], list[Path]]:
    """Text files of a user path, and the binary files skipped in a folder."""
    if not source.exists():
        raise DataError(f"data path does not exist: {source}; pass a text file or a folder of text files")
    if source.is_file():
        if source.stat().st_size == 0:
            raise DataError(f"data file is empty: {source}")
        why = _looks_binary(source)
        if why:
            raise DataError(f"data file {source} looks binary: {why}; condcomp trains on text, pass a text file or folder")
        return [source], []
    if not source.is_dir():
        raise DataError(f"data path is neither a file nor a folder: {source}")
    text, binary = [], []
    root = source.resolve()
    for dirpath, dirnames, filenames in os.walk(source):  # does not descend into linked folders
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file() or path.stat().st_size == 0:
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                binary.append(path)  # a link out of the folder is not part of it: skipped, and reported
                continue
            (binary if _looks_binary(path) else text).append(path)
    if not text:
        extra = f" ({len(binary)} binary files or links out of the folder skipped, e.g. {binary[0]})" if binary else ""
        raise DataError(f"data folder {source} has no non-empty text files{extra}")
    return text, binary


def _split_of(relpath: str, val_fraction: float, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") / 2**64
    if h < val_fraction:
        return "val"
    if h < val_fraction + test_fraction:
        return "test"
    return "train"


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONDCOMP_CACHE", Path.home() / ".cache" / "condcomp"))


def load_corpus(source: str = "stdlib", *, val_fraction: float = 0.05, test_fraction: float = 0.05,
                cache_dir: str | Path | None = None) -> Corpus:
    """Read (or reuse the cache of) a byte-level corpus.

    source: "stdlib", another named domain (``condcomp.data.domains``: python-docs, kjv, bbc-news), a
        path to a text file or folder, or a mixture of these joined by "+" ("stdlib+kjv"): each
        split is the concatenation of the parts' splits, so a part weighs by its size.
    Returns memory-mapped uint8 arrays; the cache key covers every file's path, size and mtime and
    the split fractions, so a changed source is re-read.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if "+" in source and not Path(source).expanduser().exists():
        return _mixture(source.split("+"), val_fraction=val_fraction, test_fraction=test_fraction, cache_dir=cache)
    if is_domain(source):
        named, source = source, domain_path(source, cache)
    else:
        named = None
    if source == "stdlib":
        root = stdlib_root()
        files = _stdlib_files(root)
        skipped: list[Path] = []
        description = f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library source ({root})"
        if not files:
            raise DataError(f"no .py files found under the standard library folder {root}")
    else:
        root = Path(source).expanduser().resolve()
        files, skipped = _user_files(root)
        description = f"{named} ({root})" if named else str(root)
        if root.is_file():
            root = root.parent
    rel = [str(f.relative_to(root)) for f in files]
    stats = [(r, f.stat().st_size, f.stat().st_mtime_ns) for r, f in zip(rel, files)]
    key = hashlib.sha1(json.dumps([_FORMAT_VERSION, str(root), stats, val_fraction, test_fraction]).encode()).hexdigest()[:16]
    folder = cache / "corpora" / key
    if not (folder / "meta.json").is_file():
        _build_cache(folder, files, rel, val_fraction, test_fraction, description)
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {}
    for s in SPLITS:
        n = meta["sizes"][s]
        arrays[s] = np.memmap(folder / f"{s}.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
    if skipped:
        description += (f" ({len(skipped)} binary files or links out of the folder skipped, e.g. "
                        f"{skipped[0].relative_to(root)})")
    return Corpus(description=description, num_files=len(files), skipped=len(skipped), **arrays)


def _build_cache(folder: Path, files: list[Path], rel: list[str], val_fraction: float,
                 test_fraction: float, description: str) -> None:
    by_split = {s: [] for s in SPLITS}
    for r, f in zip(rel, files):
        by_split[_split_of(r, val_fraction, test_fraction)].append(f)
    chunks = {s: [f.read_bytes() for f in by_split[s]] for s in SPLITS}
    split_rule = "path-hash"
    if any(not chunks[s] for s in SPLITS):
        # Too few files for a per-file split: cut the concatenation into contiguous stretches.
        data = b"".join(f.read_bytes() for f in files)
        n = len(data)
        n_val, n_test = int(n * val_fraction), int(n * test_fraction)
        n_train = n - n_val - n_test
        chunks = {"train": [data[:n_train]], "val": [data[n_train : n_train + n_val]], "test": [data[n_train + n_val :]]}
        split_rule = "contiguous"
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = {}
    for s in SPLITS:
        blob = b"".join(chunks[s])
        (tmp / f"{s}.bin").write_bytes(blob)
        sizes[s] = len(blob)
    meta = {"description": description, "sizes": sizes, "split_rule": split_rule,
            "files": {s: len(by_split[s]) for s in SPLITS}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, folder)  # atomic: readers see a complete cache or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
        if not (folder / "meta.json").is_file():
            raise


def _mixture(parts: list[str], *, val_fraction: float, test_fraction: float, cache_dir: Path) -> Corpus:
    """Byte-level corpora concatenated split by split (in memory; each part is cached on its own)."""
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise DataError(f"a mixture source names each part once, joined by '+' (e.g. stdlib+kjv); got {'+'.join(parts)}")
    corpora = [load_corpus(p, val_fraction=val_fraction, test_fraction=test_fraction, cache_dir=cache_dir) for p in parts]
    arrays = {s: np.concatenate([np.asarray(c.split(s)) for c in corpora]) for s in SPLITS}
    sizes = ", ".join(f"{p} {len(c.train) / 1e6:.1f} MB" for p, c in zip(parts, corpora))
    return Corpus(description=f"mixture of {sizes} (training bytes)", num_files=sum(c.num_files for c in corpora),
                  skipped=sum(c.skipped for c in corpora), **arrays)
