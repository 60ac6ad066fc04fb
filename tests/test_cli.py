import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from condcomp.cli import main
from condcomp.train.checkpoint import list_checkpoints, verify_checkpoint

from conftest import tiny_overrides


def run_cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "condcomp.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


def test_config_error_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layer: 2\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown key 'model.n_layer'" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: p, "no non-empty text files"),
])
def test_bad_data_path_is_a_clear_cli_error(tmp_path, capsys, make, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 1\n")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    data = make(empty)
    assert main(["train", "--config", str(cfg), "--data", str(data), "--run-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_last_checkpoint(tmp_path, text_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    run_dir = tmp_path / "killed"
    sets = tiny_overrides(text_file, run_dir, tmp_path / "cache", **{
        "train.steps": 400, "train.checkpoint_every": 5, "train.eval_every": 1000, "model.d_model": 64})
    args = ["train", "--config", str(cfg)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "condcomp.cli", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list_checkpoints(run_dir)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    survivors = list_checkpoints(run_dir)
    assert survivors
    for path in survivors:
        verify_checkpoint(path)  # every checkpoint that exists is whole
    killed_at = int(survivors[-1].name.split("_")[1])
    assert killed_at < 400

    done = run_cli(args + ["--resume", "--set", "train.steps=" + str(killed_at + 10)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"finished step {killed_at + 10}" in done.stdout


def test_eval_and_sample_from_a_checkpoint(tmp_path, text_file, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    sets = tiny_overrides(text_file, tmp_path / "r", tmp_path / "cache", **{"train.steps": 5})
    assert main(["train", "--config", str(cfg)] + [a for s in sets for a in ("--set", s)]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "r"), "--batches", "2"]) == 0
    assert "val bits/byte" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(tmp_path / "r"), "--prompt", "alpha", "--length", "20"]) == 0
    assert capsys.readouterr().out.startswith("alpha")
