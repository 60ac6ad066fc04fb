"""The pretrained path on the command line: convert hf -> sample / eval -> train --init -> export,
on a tiny random Llama with a BPE tokenizer trained here (nothing downloaded), and its refusals."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from condcomp.cli import main  # noqa: E402
from condcomp.train import load_model  # noqa: E402

VOCAB = 320


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A saved tiny LlamaForCausalLM and a byte-level BPE tokenizer of 300 tokens trained on words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    words = ["alpha", "beta", "gamma", "delta", "routing", "expert", "token", "layer", "skip", "depth"]
    text = [" ".join(words[(i * 7 + j) % 10] for j in range(12)) for i in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _sets(text_file, tmp_path, **extra):
    sets = {"data.source": str(text_file), "data.cache_dir": str(tmp_path / "cache"), "model.seq_len": 32,
            "train.steps": 4, "train.batch_size": 4, "train.warmup_steps": 1, "train.eval_every": 4,
            "train.eval_batches": 1, "train.checkpoint_every": 4, "train.progress": False, "train.precision": "fp32"}
    sets.update(extra)
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_convert_sample_eval_train_and_export_round_trip(hf_folder, text_file, tmp_path, capsys):
    imported = tmp_path / "imported"
    assert main(["convert", "hf", str(hf_folder), "--out", str(imported), "--seq-len", "64"]) == 0
    assert "condcomp checkpoint in" in capsys.readouterr().out
    model, cfg = load_model(imported)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, local_files_only=True).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, rtol=1e-4, atol=1e-5)
    assert main(["sample", "--checkpoint", str(imported), "--prompt", "alpha beta", "--length", "5"]) == 0
    assert capsys.readouterr().out.startswith("alpha beta")

    run = tmp_path / "mod-run"
    args = ["train", "--init", str(imported), "--run-dir", str(run)] + _sets(
        text_file, tmp_path, **{"model.block": "mod", "model.mod.every": 1})
    assert main(args) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["model"]["n_kv_heads"] == 2 and saved["model"]["block"] == "mod"
    assert saved["data"]["tokenizer"].endswith("tokenizer")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_token_ppl" in r for r in records)  # tokenized evaluation reports both
    assert main(["eval", "--checkpoint", str(run), "--batches", "1"]) == 0
    assert "token perplexity" in capsys.readouterr().out

    # A dense run continued from the import exports as Llama and reloads with the same logits.
    dense = tmp_path / "dense-run"
    assert main(["train", "--init", str(hf_folder), "--run-dir", str(dense)] + _sets(text_file, tmp_path)) == 0
    out = tmp_path / "exported"
    assert main(["export", str(dense), "--out", str(out)]) == 0
    trained, _ = load_model(dense)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(x).logits, back(x).logits, rtol=1e-4, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_init_starts_from_the_pretrained_weights(hf_folder, text_file, tmp_path):
    from condcomp.train import Trainer
    from condcomp.train.pretrained_init import load_run_config

    cfg = load_run_config(None, [s for s in _sets(text_file, tmp_path) if s != "--set"] +
                          [f"model.init={hf_folder}", f"run_dir={tmp_path / 'r'}"])
    trainer = Trainer(cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, local_files_only=True)
    torch.testing.assert_close(trainer.model.embed.weight, hf.model.embed_tokens.weight)
    torch.testing.assert_close(trainer.model.blocks[1].ffn.down.weight, hf.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("extra, message", [
    ({"model.d_model": 64}, "model.d_model: 64 conflicts with the pretrained model's 32"),
    ({"model.seq_len": 4096}, "model.seq_len: 4096 exceeds the pretrained model's 128"),
    ({"model.n_layers": 5}, "model.n_layers: 5 conflicts"),
])
def test_init_with_a_disagreeing_config_names_the_key(hf_folder, text_file, tmp_path, capsys, extra, message):
    args = ["train", "--init", str(hf_folder), "--run-dir", str(tmp_path / "r")] + _sets(text_file, tmp_path, **extra)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_refusals_write_nothing(hf_folder, text_file, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    assert main(["convert", "hf", str(gpt2), "--out", str(tmp_path / "x")]) == 2
    assert "'gpt2' is not supported; supported: llama, mistral, qwen2, mixtral" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    run = tmp_path / "mod"
    assert main(["train", "--run-dir", str(run)] + _sets(text_file, tmp_path, **{
        "model.block": "mod", "model.d_model": 32, "model.n_heads": 2, "model.n_layers": 1})) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf-out")]) == 2
    assert "block: mod has no Hugging Face counterpart" in capsys.readouterr().err
    assert not (tmp_path / "hf-out").exists()

    # A model folder whose weights are missing.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_folder / "config.json").read_text())
    assert main(["convert", "hf", str(broken), "--out", str(tmp_path / "y")]) == 2
    assert "could not load the model in" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()

    # A tokenizer larger than the model's vocabulary.
    args = ["train", "--run-dir", str(tmp_path / "t")] + _sets(text_file, tmp_path, **{
        "data.tokenizer": str(hf_folder), "model.vocab_size": 100, "model.d_model": 32, "model.n_heads": 2})
    assert main(args) == 2
    assert "has 300 tokens but model.vocab_size is 100" in capsys.readouterr().err


def test_init_into_spla_calibrates_the_residual_weight_on_training_windows(hf_folder, text_file, tmp_path, capsys):
    from condcomp.convert.hf import from_hf
    from condcomp.data import train_batch
    from condcomp.train import Trainer
    from condcomp.train.pretrained_init import load_run_config

    spla = {"model.attention": "spla", "model.spla.block": 8, "model.spla.top_k": 1}
    cfg = load_run_config(None, [s for s in _sets(text_file, tmp_path, **spla) if s != "--set"] +
                          [f"model.init={hf_folder}", f"run_dir={tmp_path / 'r'}"])
    trainer = Trainer(cfg)
    assert "calibrated 2 layers' added parameters on 128 training tokens" in capsys.readouterr().out
    x, _ = train_batch(trainer.corpus.train, step=0, seed=cfg.train.seed, batch_size=4, seq_len=32)
    reference, _ = from_hf(hf_folder, seq_len=32, overrides={"attention": "spla", "spla": {"block": 8, "top_k": 1}},
                           calibrate_on=x)
    for mine, theirs in zip(trainer.model.blocks, reference.blocks):
        torch.testing.assert_close(mine.attn.log_alpha, theirs.attn.log_alpha)
        assert not torch.allclose(mine.attn.log_alpha, torch.full_like(mine.attn.log_alpha, -2.0794), atol=1e-3)


def test_prune_a_pretrained_decoder_compact_it_and_send_it_back_out(hf_folder, text_file, tmp_path, capsys):
    run, small, exported = tmp_path / "l0", tmp_path / "compact", tmp_path / "exported"
    assert main(["prune", "train", "--init", str(hf_folder), "--method", "static", "--sparsity", "0.5",
                 "--steps", "4", "--run-dir", str(run)] + _sets(text_file, tmp_path)) == 0
    assert main(["prune", "compact", "--checkpoint", str(run), "--out", str(small)]) == 0
    assert "d_ff 64 -> 32" in capsys.readouterr().out
    pruned, _ = load_model(run)
    compact, cfg = load_model(small)
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(compact(x).logits, pruned(x).logits, rtol=1e-5, atol=1e-5)
    assert main(["sample", "--checkpoint", str(small), "--prompt", "alpha beta", "--length", "5"]) == 0
    assert main(["export", str(small), "--out", str(exported)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    assert hf.config.intermediate_size == 32
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, compact(x).logits, rtol=1e-4, atol=1e-5)
