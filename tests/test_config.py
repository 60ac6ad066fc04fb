import pytest

from condcomp.config import ConfigError, ModelConfig, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.model.d_model == 256 and cfg.data.source == "stdlib"


def test_unknown_key_is_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model\.d_modle'.*did you mean 'model\.d_model'"):
        load_config(write(tmp_path, "model:\n  d_modle: 64\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        load_config(write(tmp_path, "trian:\n  steps: 3\n"))


@pytest.mark.parametrize("yaml_text, key", [
    ("model:\n  d_model: 'big'\n", "model.d_model"),
    ("model:\n  n_layers: 2.5\n", "model.n_layers"),
    ("train:\n  progress: 3\n", "train.progress"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("train:\n  aux_loss_weights: 3\n", "train.aux_loss_weights"),
])
def test_wrong_type_names_the_key(tmp_path, yaml_text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, yaml_text))


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"),
    ("train.steps=0", "train.steps"),
    ("model.dropout=1.0", "model.dropout"),
    ("train.precision=fp8", "train.precision"),
    ("model.ffn=nope", "model.ffn"),
    ("train.aux_loss_weights.load_balance=-1", "train.aux_loss_weights.load_balance"),
])
def test_out_of_range_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_cross_field_check_heads_divide_width():
    with pytest.raises(ConfigError, match="n_heads"):
        load_config(None, ["model.d_model=100", "model.n_heads=3"])


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    assert load_config(write(tmp_path, "train:\n  lr: 3e-4\n")).train.lr == pytest.approx(3e-4)


def test_overrides_apply_and_are_typed():
    cfg = load_config(None, ["train.steps=7", "model.ffn=gelu"])
    assert cfg.train.steps == 7 and cfg.model.ffn == "gelu" and cfg.model.ffn_hidden == 4 * cfg.model.d_model


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="d_model"):
        ModelConfig(d_model=2)


def test_exponents_read_as_numbers_before_validation(tmp_path):
    """A run's config.json holds 1e-05 (JSON's spelling); YAML 1.1 would read it as a string, and a
    comparison against the pretrained model's 1e-05 would fail."""
    from condcomp.settings import read_yaml

    raw = read_yaml(write(tmp_path, "model:\n  norm_eps: 1e-05\ntrain:\n  max_flops: 3e13\n"), ["train.lr=1e-4"])
    assert raw["model"]["norm_eps"] == 1e-05 and raw["train"]["max_flops"] == 3e13 and raw["train"]["lr"] == 1e-4
