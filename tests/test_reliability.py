"""A user's mistake or a fault never costs a run, never mixes two runs, and never shows a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from condcomp.cli import main
from condcomp.config import ConfigError, load_config
from condcomp.train import Trainer, TrainingError
from condcomp.train.checkpoint import list_checkpoints

from conftest import tiny_overrides


def test_a_second_training_into_the_same_run_folder_is_refused_and_the_first_is_untouched(tiny_config):
    first = Trainer(tiny_config("shared", **{"train.steps": 4, "train.checkpoint_every": 2}))
    with pytest.raises(TrainingError, match="is in use by a training process .pid"):
        Trainer(tiny_config("shared", **{"train.steps": 4}), resume=True)
    result = first.train()
    assert result.step == 4
    records = [json.loads(line) for line in open(f"{first.run_dir}/metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    # Finished: the lock is gone and the run resumes.
    assert Trainer(tiny_config("shared", **{"train.steps": 4}), resume=True).step == 4


def test_a_lock_left_by_a_killed_process_does_not_block_a_resume(tiny_config, tmp_path):
    cfg = tiny_config("killed-lock")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        os.makedirs({str(cfg.run_dir)!r}, exist_ok=True)
        fh = open(os.path.join({str(cfg.run_dir)!r}, ".lock"), "a+")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(TrainingError, match="in use"):
        Trainer(cfg, resume=True)
    holder.kill()
    holder.wait()
    assert Trainer(cfg, resume=True).step == 0


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one_and_says_so(tiny_config, capsys):
    cfg = tiny_config("corrupt", **{"train.steps": 6, "train.checkpoint_every": 3, "train.keep_checkpoints": 3})
    Trainer(cfg).train()
    newest = list_checkpoints(cfg.run_dir)[-1]
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    resumed = Trainer(cfg, resume=True)
    out = capsys.readouterr().out
    assert resumed.step == 3
    assert f"{newest.name}" in out and "resuming from the older intact checkpoint step_00000003" in out


def test_nan_in_a_routed_model_stops_cleanly_with_a_true_message(tiny_config):
    cfg = tiny_config("nan-moe", **{"model.ffn": "moe", "model.moe.num_experts": 4, "train.steps": 3})
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.embed.weight.fill_(float("nan"))
    with pytest.raises(TrainingError) as info:
        trainer.train()
    message = str(info.value)
    assert "NaN or inf" in message and "no checkpoint was written yet" in message
    assert "enable train.grad_clip" not in message  # clipping is on by default


@pytest.mark.parametrize("args, message", [
    (["sample", "--checkpoint", "x", "--top-k", "0"], "--top-k: must be >= 1"),
    (["sample", "--checkpoint", "x", "--top-k", "-3"], "--top-k: must be >= 1"),
    (["sample", "--checkpoint", "x", "--temperature", "-1"], "--temperature: must be >= 0.0"),
    (["sample", "--checkpoint", "x", "--length", "-5"], "--length: must be >= 1"),
    (["sample", "--checkpoint", "x", "--temperature", "nan"], "must be a finite number"),
    (["eval", "--checkpoint", "x", "--batches", "0"], "--batches: must be >= 1"),
])
def test_bad_command_line_numbers_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf", ".inf", "-inf"])
def test_non_finite_config_numbers_are_refused(value, text_file, tmp_path):
    with pytest.raises(ConfigError, match="train.lr: must be a finite number"):
        load_config(None, tiny_overrides(text_file, tmp_path / "r", tmp_path / "c", **{"train.lr": value}))


def test_a_byte_model_smaller_than_the_byte_alphabet_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="model.vocab_size: 100 is smaller than the 256 byte values"):
        Trainer(tiny_config("small-vocab", **{"model.vocab_size": 100}))


GRID = """\
name: g
budget: {{flops: 1e9}}
base: {{model: {{d_model: 32, n_layers: 1, n_heads: 2, seq_len: 16}}}}
variants:
{variants}
"""


@pytest.mark.parametrize("variants, message", [
    ("  ../escape: {}", "'../escape' is not a usable variant name"),
    ("  /abs: {}", "is not a usable variant name"),
    ("  a/b: {}", "is not a usable variant name"),
    ("  ..: {}", "is not a usable variant name"),
    ("  dense: {}\n  dense: {set: [model.ffn=gelu]}", "the key 'dense' appears twice"),
    ("  dense: {set: [model.ffn=gelu]", "not valid YAML at line"),
])
def test_bad_grids_are_refused_before_anything_is_written(variants, message, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(variants=variants))
    out = tmp_path / "out"
    assert main(["compare", "--grid", str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def _train_cmd(text_file, tmp_path, run_dir, steps):
    sets = tiny_overrides(text_file, run_dir, tmp_path / "cache", **{
        "train.steps": steps, "train.checkpoint_every": 1000, "train.eval_every": 1000, "model.d_model": 64})
    return [sys.executable, "-m", "condcomp", "train"] + [a for s in sets for a in ("--set", s)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_saves_a_checkpoint_and_the_resumed_run_is_identical(sig, text_file, tmp_path):
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(_train_cmd(text_file, tmp_path, run_dir, 60), cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or metrics.read_text().count('"loss"') < 3):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint" in err and "--resume" in err and "Traceback" not in err
    saved = list_checkpoints(run_dir)
    assert saved, "no checkpoint was saved on the interrupt"
    stopped_at = int(saved[-1].name.split("_")[1])
    assert 3 <= stopped_at < 60
    subprocess.run(_train_cmd(text_file, tmp_path, run_dir, 60) + ["--resume"], cwd=tmp_path, check=True,
                   capture_output=True)
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(text_file, tmp_path, reference, 60), cwd=tmp_path, check=True, capture_output=True)
    losses = [json.loads(l)["loss"] for l in metrics.read_text().splitlines() if '"loss"' in l]
    want = [json.loads(l)["loss"] for l in (reference / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses == want  # every step once, bit for bit


@pytest.mark.slow
def test_a_killed_compare_leaves_no_training_child(text_file, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(textwrap.dedent(f"""\
        name: orphan
        budget: {{flops: 1e15}}
        base:
          model: {{d_model: 64, n_layers: 2, n_heads: 2, seq_len: 32}}
          data: {{source: {text_file}, cache_dir: {tmp_path / 'cache'}}}
          train: {{batch_size: 4, eval_every: 100000, checkpoint_every: 100000, progress: false}}
        variants:
          dense: {{}}
        """))
    parent = subprocess.Popen([sys.executable, "-m", "condcomp", "compare", "--grid", str(grid), "--out",
                               str(tmp_path / "out")], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    metrics = tmp_path / "out" / "variants" / "dense" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.1)
    children = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the compare started no child"
    parent.kill()
    parent.wait()
    deadline = time.time() + 60
    alive = children
    while alive and time.time() < deadline:
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
        time.sleep(0.2)
    assert not alive, f"training children {alive} outlived the killed compare"


def test_relative_paths_in_a_config_file_are_relative_to_the_file(tmp_path, text_file, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "corpus.txt").write_text(text_file.read_text())
    (folder / "c.yaml").write_text("data: {source: corpus.txt}\nrun_dir: runs/x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "c.yaml", ["data.cache_dir=cache"])
    assert cfg.data.source == str((folder / "corpus.txt").resolve())
    assert cfg.run_dir == "runs/x" and cfg.data.cache_dir == "cache"  # outputs and --set: working directory


def test_resume_without_a_config_uses_the_runs_own_and_names_a_changed_key(tiny_config, tmp_path, capsys):
    cfg = tiny_config("own-config", **{"model.d_model": 48, "train.steps": 4, "train.checkpoint_every": 2})
    Trainer(cfg).train(until=2)
    assert main(["train", "--resume", "--run-dir", str(cfg.run_dir)]) == 0  # d_model 48 read from the run
    assert "finished step 4" in capsys.readouterr().out
    other = tmp_path / "other.yaml"
    other.write_text("model: {d_model: 64}\n")
    assert main(["train", "--config", str(other), "--resume", "--run-dir", str(cfg.run_dir),
                 "--set", "train.steps=6"]) == 2
    assert "model.d_model: 48 -> 64" in capsys.readouterr().err


def test_config_show_version_and_help_defaults(capsys):
    assert main(["config", "--show", "--set", "model.ffn=moe", "--set", "model.moe.k=2"]) == 0
    import yaml

    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["ffn"] == "moe" and shown["model"]["moe"]["k"] == 2 and shown["train"]["lr"] == 3e-3
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("condcomp ")
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "(default: 40)" in capsys.readouterr().out


def test_a_data_folder_skips_links_out_of_it_and_binary_files_and_says_so(tmp_path, text_file, capsys):
    from condcomp.data import load_corpus

    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(text_file.read_text()[i * 20000:(i + 1) * 20000])
    secret = tmp_path / "secret.txt"
    secret.write_text("PRIVATE " * 1000)
    (folder / "link.txt").symlink_to(secret)
    (folder / "inside_link.txt").symlink_to(folder / "part0.txt")
    (folder / "image.bin").write_bytes(bytes(range(256)) * 10)
    corpus = load_corpus(str(folder), cache_dir=tmp_path / "cache")
    everything = b"".join(bytes(corpus.split(s)) for s in ("train", "val", "test"))
    assert b"PRIVATE" not in everything and corpus.num_files == 4  # three parts and the link inside
    assert corpus.skipped == 2 and "2 binary files or links out of the folder skipped" in corpus.description


def test_plot_draws_curves_and_loads_of_several_runs(tiny_config, tmp_path, capsys):
    dense = tiny_config("p-dense", **{"train.steps": 4, "train.eval_every": 2})
    moe = tiny_config("p-moe", **{"train.steps": 4, "train.eval_every": 2, "model.ffn": "moe",
                                  "model.moe.num_experts": 4})
    Trainer(dense).train()
    Trainer(moe).train()
    assert main(["plot", dense.run_dir, moe.run_dir, "--out", str(tmp_path / "plots")]) == 0
    for name in ("loss.png", "val.png", "loads-p-moe.png", "index.html"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000, name
    page = (tmp_path / "plots" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "p-dense" in page
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_the_metrics_log_stays_valid_json_with_non_finite_numbers(tmp_path):
    from condcomp.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path / "m.jsonl")
    log.reset()
    log.append({"step": 1, "grad_norm": float("inf"), "loss": float("nan"), "loads": [1.0, float("-inf")]})
    line = (tmp_path / "m.jsonl").read_text()
    assert "Infinity" not in line and "NaN" not in line
    assert json.loads(line) == {"step": 1, "grad_norm": None, "loss": None, "loads": [1.0, None]}


def test_every_option_of_every_command_has_help():
    import argparse

    from condcomp.cli import build_parser

    missing = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, prefix + [name])
            elif action.help is None:
                missing.append(" ".join(prefix + [action.option_strings[0] if action.option_strings else action.dest]))

    walk(build_parser(), ["condcomp"])
    assert not missing, missing
