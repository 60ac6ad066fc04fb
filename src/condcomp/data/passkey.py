"""The passkey (needle-in-a-haystack) task: a five-digit key hidden at some depth of repetitive filler
text, asked for at the end. A model that can read the whole context copies the key; one that
cannot read far enough back guesses (1 in 10 per digit).

    ... The grass is green. The sky is blue. ... The pass key is 71432. Remember it. 71432 is the
    pass key. ... The sun is yellow. Here we go. ... What is the pass key? The pass key is 71432.

``passkey`` is a named data domain (``data.source: passkey``, or mixed: ``stdlib+passkey``): a
generated folder of such documents of random lengths and depths, written once to the cache.
``passkey_examples`` builds evaluation documents of an exact length with the key at chosen depths,
and ``retrieval_accuracy`` scores a model on them by its greedy prediction of the key's digits.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
          "The river runs to the sea.", "A cat sleeps by the door.", "Rain falls on the old roof.")
QUESTION = " What is the pass key? The pass key is "
KEY_DIGITS = 5
# Bump when the generated documents change: the cache folder is named by it.
_FORMAT = 1


def _needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def _filler(rng: random.Random, n_bytes: int) -> str:
    out, size = [], 0
    while size < n_bytes:
        sentence = " " + rng.choice(FILLER)
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_bytes]


def passkey_document(rng: random.Random, length: int, depth: float) -> tuple[str, str]:
    """A document of exactly ``length`` bytes ending with the key: (text, key). The needle starts at
    ``depth`` (0 = start, 1 = just before the question) of the filler."""
    key = "".join(rng.choice("0123456789") for _ in range(KEY_DIGITS))
    needle, tail = _needle(key), QUESTION + key + "."
    room = length - len(needle) - len(tail)
    if room < 0:
        raise ValueError(f"a passkey document needs at least {len(needle) + len(tail)} bytes, got {length}")
    before = int(round(depth * room))
    return _filler(rng, before) + needle + _filler(rng, room - before) + tail, key


def write_passkey_corpus(folder: Path, *, n_docs: int = 12000, min_len: int = 256, max_len: int = 4096,
                         seed: int = 0, files: int = 40) -> Path:
    """Generate the training domain: ``n_docs`` documents of uniform random length and needle depth,
    one per line, spread over ``files`` text files (files are the unit of the train/val/test split).
    Written to a temporary folder and renamed, so readers see all of it or none."""
    if folder.is_dir():
        return folder
    rng = random.Random(seed)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    per_file = -(-n_docs // files)
    for f in range(files):
        docs = [passkey_document(rng, rng.randint(min_len, max_len), rng.random())[0] for _ in range(per_file)]
        (tmp / f"passkey-{f:03d}.txt").write_text("\n".join(docs) + "\n", encoding="ascii")
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process wrote it first; same content
    return folder


def passkey_domain(cache: Path) -> Path:
    return write_passkey_corpus(cache / "domains" / f"passkey-v{_FORMAT}")


@dataclass
class PasskeyExample:
    tokens: torch.Tensor  # [length] int64 bytes of the document
    key_start: int        # index of the key's first digit at the end
    depth: float


def passkey_examples(length: int, depths=(0.1, 0.3, 0.5, 0.7, 0.9), per_depth: int = 8,
                     seed: int = 1234) -> list[PasskeyExample]:
    """Evaluation documents of exactly ``length`` bytes, ``per_depth`` at each needle depth, from a
    seed the training corpus does not use."""
    rng = random.Random(seed)
    out = []
    for depth in depths:
        for _ in range(per_depth):
            text, key = passkey_document(rng, length, depth)
            data = torch.tensor(list(text.encode("ascii")), dtype=torch.int64)
            out.append(PasskeyExample(data, length - 1 - KEY_DIGITS, depth))
    return out


@torch.no_grad()
def retrieval_accuracy(model, examples: list[PasskeyExample], batch_size: int = 4) -> dict[float, dict[str, float]]:
    """Per depth: the fraction of documents whose key the model predicts entirely (each digit the
    argmax given the true earlier ones), and the fraction of digits right. Chance: 1e-5 and 0.1."""
    model.eval()
    hits: dict[float, list[tuple[bool, float]]] = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        tokens = torch.stack([e.tokens for e in chunk])
        logits = model(tokens[:, :-1]).logits  # position p predicts token p + 1
        for row, e in enumerate(chunk):
            predicted = logits[row, e.key_start - 1 : e.key_start - 1 + KEY_DIGITS].argmax(-1)
            right = predicted == e.tokens[e.key_start : e.key_start + KEY_DIGITS]
            hits.setdefault(e.depth, []).append((bool(right.all()), float(right.float().mean())))
    return {depth: {"key": sum(h for h, _ in v) / len(v), "digits": sum(d for _, d in v) / len(v)}
            for depth, v in hits.items()}
