"""Fuzz the command line: hypothesis draws values for every command's numeric and path options; no
combination may end in a traceback. Each call must return 0, 2 (a user's mistake, one line) or exit
through argparse with code 2."""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from condcomp.cli import main

from conftest import tiny_overrides

NUMBERS = st.one_of(st.integers(-5, 5), st.sampled_from(["0", "-1", "1e9", "nan", "inf", "-inf", "abc", "", "2.5",
                                                        "1e-9", "99999999999999999999"]))


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Paths worth trying: missing, an empty folder, a text file, a binary file, a tiny finished run."""
    import random

    tmp = tmp_path_factory.mktemp("fuzz")
    text = tmp / "corpus.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(8)) for _ in range(3000)))
    (tmp / "empty").mkdir()
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (tmp / "bad.yaml").write_text("model: {d_model: [\n")
    run = tmp / "run"
    args = ["train"] + [a for s in tiny_overrides(text, run, tmp / "cache", **{"train.steps": 2,
                                                                               "train.eval_every": 2,
                                                                               "train.checkpoint_every": 2})
                        for a in ("--set", s)]
    assert main(args) == 0
    return {"missing": str(tmp / "missing"), "empty": str(tmp / "empty"), "text": str(text),
            "binary": str(tmp / "binary.bin"), "bad_yaml": str(tmp / "bad.yaml"), "run": str(run),
            "out": str(tmp / "out"), "cache": str(tmp / "cache"), "tmp": str(tmp)}


def _command(draw, p):
    path = draw(st.sampled_from(["missing", "empty", "text", "binary", "bad_yaml", "run"]))
    number = lambda: str(draw(NUMBERS))  # noqa: E731
    kind = draw(st.sampled_from(["sample", "eval", "export", "convert", "compare", "train", "config"]))
    if kind == "sample":
        return ["sample", "--checkpoint", p[path], "--length", number(), "--temperature", number(),
                "--top-k", number(), "--seed", number()]
    if kind == "eval":
        return ["eval", "--checkpoint", p[path], "--batches", number(), "--split",
                draw(st.sampled_from(["val", "test", "nope"]))]
    if kind == "export":
        return ["export", p[path], "--out", p["out"] + number()]
    if kind == "convert":
        return ["convert", "hf", p[path], "--out", p["out"] + number(), "--seq-len", number()]
    if kind == "compare":
        return ["compare", "--grid", p[path], "--out", p["out"] + number()]
    if kind == "config":
        return ["config", "--config", p[path], "--set", f"train.lr={number()}"]
    key = draw(st.sampled_from(["train.lr", "train.eval_batches", "model.d_model", "model.n_heads", "train.batch_size",
                                "model.vocab_size", "train.warmup_steps", "model.seq_len", "train.grad_clip"]))
    # Always tiny and one step long (train.steps is not drawn: a valid huge value would rightly train for
    # that long), so a valid draw trains for a moment; run folders are fresh each time.
    sets = tiny_overrides(p["text"] if path != "binary" else p["binary"], f"{p['tmp']}/t{draw(st.integers(0, 10**9))}",
                          p["cache"], **{"train.steps": 1, "train.eval_every": 1, "train.checkpoint_every": 1})
    return ["train"] + [a for s in sets for a in ("--set", s)] + ["--set", f"{key}={number()}"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_command_line_ends_in_a_traceback(places, data):
    argv = _command(data.draw, places)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: usage and a one-line error
            code = e.code
    assert code in (0, 2), (argv, code, err.getvalue()[-500:])
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue()[-2000:])
