import numpy as np
import pytest
import torch

from condcomp.data import DataError, decode, encode, eval_batches, load_corpus, train_batch
from condcomp.data.corpus import _split_of, _stdlib_files, stdlib_root


def test_stdlib_corpus_excludes_tests_and_installed_packages():
    files = _stdlib_files(stdlib_root())
    parts = {p for f in files for p in f.relative_to(stdlib_root()).parts[:-1]}
    assert files and not parts & {"test", "tests", "idle_test", "site-packages"}
    assert any(f.name == "argparse.py" for f in files)


def test_split_is_a_pure_function_of_the_path():
    names = [f"pkg/mod{i}.py" for i in range(2000)]
    first = [_split_of(n, 0.05, 0.05) for n in names]
    assert first == [_split_of(n, 0.05, 0.05) for n in names]
    frac_val = first.count("val") / len(first)
    assert 0.03 < frac_val < 0.07 and first.count("test") > 0


def test_stdlib_corpus_loads_with_all_splits(tmp_path):
    c = load_corpus("stdlib", cache_dir=tmp_path)
    assert len(c.train) > 5_000_000 and len(c.val) > 100_000 and len(c.test) > 100_000
    again = load_corpus("stdlib", cache_dir=tmp_path)  # from the cache
    assert np.array_equal(np.asarray(c.val[:1000]), np.asarray(again.val[:1000]))


def test_single_file_splits_contiguously(text_file, tmp_path):
    c = load_corpus(str(text_file), cache_dir=tmp_path / "cache")
    data = text_file.read_bytes()
    assert bytes(np.asarray(c.train)) + bytes(np.asarray(c.val)) + bytes(np.asarray(c.test)) == data


def test_folder_reads_text_and_skips_binary(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"document {i}\n" * 100)
    (folder / "image.bin").write_bytes(b"\x89PNG\x00\x00binary")
    c = load_corpus(str(folder), cache_dir=tmp_path / "cache")
    total = len(c.train) + len(c.val) + len(c.test)
    assert total == sum((folder / f"{i}.txt").stat().st_size for i in range(3))
    assert "1 binary files or links out of the folder skipped, e.g. image.bin" in c.description


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"ab\x00cd" * 10, "binary"),
    (b"caf\xe9 " * 10, "not UTF-8"),
])
def test_bad_data_paths_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_corpus(str(path), cache_dir=tmp_path / "cache")


def test_folder_with_only_binary_files_is_an_error(tmp_path):
    folder = tmp_path / "bins"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="no non-empty text files"):
        load_corpus(str(folder), cache_dir=tmp_path / "cache")


def test_train_batch_depends_only_on_seed_and_step():
    data = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)
    a = train_batch(data, step=3, seed=1, batch_size=4, seq_len=16)
    b = train_batch(data, step=3, seed=1, batch_size=4, seq_len=16)
    c = train_batch(data, step=4, seed=1, batch_size=4, seq_len=16)
    assert all(torch_equal(x, y) for x, y in zip(a, b)) and not torch_equal(a[0], c[0])
    x, y = a
    assert torch_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one byte


def torch_equal(a, b):
    return bool((a == b).all())


def test_eval_batches_cover_the_split_and_repeat():
    data = np.arange(1000, dtype=np.uint8)
    first = [x for x, _ in eval_batches(data, batch_size=4, seq_len=10, max_batches=3)]
    second = [x for x, _ in eval_batches(data, batch_size=4, seq_len=10, max_batches=3)]
    assert len(first) == 3 and all(torch_equal(a, b) for a, b in zip(first, second))
    assert first[-1][-1, 0] > 200  # windows are spread across the split, not only its start


def test_encode_decode_round_trip():
    text = "déf f(x): return 'λ'"
    assert decode(encode(text).tolist()) == text


def test_a_mixture_source_concatenates_each_split_of_its_parts(text_file, tmp_path):
    from condcomp.data import load_corpus

    other = tmp_path / "other.txt"
    other.write_text("zebra yak xylophone\n" * 3000)
    a = load_corpus(str(text_file), cache_dir=tmp_path / "c")
    b = load_corpus(str(other), cache_dir=tmp_path / "c")
    mix = load_corpus(f"{text_file}+{other}", cache_dir=tmp_path / "c")
    for split in ("train", "val", "test"):
        assert bytes(mix.split(split)) == bytes(a.split(split)) + bytes(b.split(split))
    assert mix.description.startswith("mixture of ")
    with pytest.raises(DataError, match="names each part once"):
        load_corpus(f"{other}+{other}", cache_dir=tmp_path / "c")


def test_relative_parts_of_a_mixture_resolve_against_the_config_file(tmp_path):
    from condcomp.config import resolve_file_paths

    out = resolve_file_paths({"data": {"source": "stdlib+texts/a.txt+kjv"}}, tmp_path)
    assert out["data"]["source"] == f"stdlib+{(tmp_path / 'texts/a.txt').resolve()}+kjv"


# ----------------------------------------------------------------------------------------------
# Passkey documents


def test_passkey_documents_have_the_exact_length_and_the_key_where_the_examples_say():
    import random

    from condcomp.data.passkey import KEY_DIGITS, QUESTION, passkey_document, passkey_examples

    for depth in (0.0, 0.5, 1.0):
        text, key = passkey_document(random.Random(3), 1000, depth)
        assert len(text) == 1000 and text.endswith(QUESTION + key + ".")
        assert text.count(key) >= 3  # the needle states it twice, the answer once
    needle_at = [passkey_document(random.Random(3), 1000, d)[0].index("pass key is") for d in (0.1, 0.9)]
    assert needle_at[0] < needle_at[1]
    for e in passkey_examples(600, depths=(0.2, 0.8), per_depth=3):
        assert e.tokens.shape == (600,)
        digits = bytes(e.tokens[e.key_start : e.key_start + KEY_DIGITS].tolist()).decode()
        assert digits.isdigit() and bytes(e.tokens.tolist()).decode().count(digits) >= 3
    with pytest.raises(ValueError, match="at least"):
        passkey_document(random.Random(0), 50, 0.5)


def test_retrieval_accuracy_is_one_for_an_oracle_and_near_chance_for_a_guesser():
    from types import SimpleNamespace

    from condcomp.data.passkey import passkey_examples, retrieval_accuracy

    examples = passkey_examples(400, depths=(0.1, 0.9), per_depth=4)
    by_tokens = {tuple(e.tokens[:-1].tolist()): e.tokens for e in examples}

    class Oracle(torch.nn.Module):  # knows every document: predicts each next byte
        def forward(self, x):
            logits = torch.zeros(*x.shape, 256)
            for row in range(x.shape[0]):
                logits[row, torch.arange(x.shape[1]), by_tokens[tuple(x[row].tolist())][1:]] = 1.0
            return SimpleNamespace(logits=logits)

    class Constant(torch.nn.Module):  # always says "0"
        def forward(self, x):
            logits = torch.zeros(*x.shape, 256)
            logits[..., ord("0")] = 1.0
            return SimpleNamespace(logits=logits)

    assert all(v == {"key": 1.0, "digits": 1.0} for v in retrieval_accuracy(Oracle(), examples).values())
    constant = retrieval_accuracy(Constant(), examples)
    assert all(v["key"] < 1.0 and v["digits"] < 0.5 for v in constant.values())


def test_passkey_is_a_named_domain(tmp_path):
    corpus = load_corpus("passkey", cache_dir=tmp_path)
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 0
    assert b"What is the pass key?" in bytes(corpus.val[:20000])
