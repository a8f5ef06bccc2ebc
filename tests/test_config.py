"""Config: typed fields, YAML, overrides, whole-config validation, and the shipped config files."""

from importlib import resources

import pytest
import yaml

from lmforge.config import RunConfig, all_keys, config_from_dict, iter_fields, load_config
from lmforge.errors import ConfigError


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.depth == 4 and cfg.data.source == "stdlib"
    assert cfg.tokenizer_name() == "stdlib-bpe4096"


def test_every_field_is_documented():
    for section, f in iter_fields():
        assert len(f.metadata.get("doc", "")) > 10, f"{section}.{f.name} has no doc string"


def test_yaml_then_flags_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  depth: 6\ntrain:\n  lr: 0.001\n  max_steps: 10\n")
    cfg = load_config(path, {"model.depth": "8"})
    assert cfg.model.depth == 8  # flag beats YAML
    assert cfg.train.lr == 0.001  # YAML beats default
    assert cfg.train.max_steps == 10


def test_unknown_yaml_key_names_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dept: 6\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.dept'.*did you mean 'model.depth'"):
        load_config(path)


def test_unknown_override_names_closest():
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(None, {"train.max_step": "3"})


@pytest.mark.parametrize("key,value,message", [
    ("model.depth", "four", "expects an integer"),
    ("model.qk_norm", "maybe", "expects true or false"),
    ("train.lr", "fast", "expects a number"),
    ("model.depth", "0", "must be positive"),
    ("train.optimizer", "sgd", "choose one of muon, adamw"),
    ("data.val_fraction", "1.5", r"val_fraction must be in \[0, 1\)"),
])
def test_bad_values_name_the_flag(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {key: value})


def test_vocab_too_large_for_uint16():
    with pytest.raises(ConfigError, match="does not fit --data.token_dtype uint16"):
        load_config(None, {"tokenizer.vocab_size": "70000", "data.token_dtype": "uint16"})
    assert load_config(None, {"tokenizer.vocab_size": "70000"}).tokenizer.vocab_size == 70000  # auto -> uint32


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: [depth: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)


def test_roundtrip_through_saved_yaml():
    cfg = load_config(None, {"model.depth": "3", "train.max_steps": "7", "name": "x"})
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_stop_condition_required():
    with pytest.raises(ConfigError, match="no stop condition"):
        RunConfig().require_stop_condition()


def test_shipped_configs_load():
    configs = list(resources.files("lmforge").joinpath("configs").iterdir())
    assert configs, "no packaged configs found"
    for item in configs:
        if item.name.endswith(".yaml"):
            cfg = config_from_dict(yaml.safe_load(item.read_text()))
            cfg.require_stop_condition()


def test_keys_are_unique():
    keys = all_keys()
    assert len(keys) == len(set(keys))
