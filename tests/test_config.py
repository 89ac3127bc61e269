"""Config loading: defaults < YAML < overrides, errors that name the key."""

from pathlib import Path

import pytest
import yaml

from visual_rft.config import ConfigError, OptimConfig, load_config, parse_overrides, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_yaml_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  beta: 0.1\n  num_generations: 4\nmodel:\n  lora:\n    enabled: true\n")
    cfg = load_config(path, ["grpo.beta=0.0", "task.mode=visual_rft", "grpo.optim.learning_rate=3e-4"])
    assert cfg.grpo.beta == 0.0 and cfg.grpo.num_generations == 4
    assert cfg.model.lora.enabled is True and cfg.model.lora.r == 16
    assert cfg.task.mode == "visual_rft" and cfg.grpo.optim.learning_rate == 3e-4
    assert cfg.grpo.epsilon == 0.2  # untouched default stays explicit


def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  num_generation: 4\n")
    with pytest.raises(ConfigError, match=r"grpo\.num_generation.*did you mean 'num_generations'"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        load_config(None, ["trainer.lr=1"])


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"grpo\.num_generations: expected int"):
        load_config(None, ["grpo.num_generations=eight"])
    with pytest.raises(ConfigError, match=r"task\.mode: 'lenient' is not one of"):
        load_config(None, ["task.mode=lenient"])
    with pytest.raises(ConfigError, match=r"model\.freeze_vision: expected true/false"):
        load_config(None, ["model.freeze_vision=3"])
    with pytest.raises(ConfigError, match=r"task\.rewards: expected a list"):
        load_config(None, ["task.rewards=accuracy"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        load_config(None, ["grpo.num_generations=1"])
    with pytest.raises(ConfigError, match="reward_weights has 1 entries"):
        load_config(None, ["task.reward_weights=[1.0]"])


def test_int_is_accepted_for_float_and_round_trips(tmp_path):
    cfg = load_config(None, ["grpo.beta=0", "grpo.num_epochs=2"])
    assert isinstance(cfg.grpo.beta, float) and cfg.grpo.num_epochs == 2.0
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["grpo.beta"])
    assert parse_overrides(["a.b=[1, 2]", "c=x"]) == {"a": {"b": [1, 2]}, "c": "x"}


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def _leaves(tree: dict, where: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{where}{key}.")
        else:
            yield f"{where}{key}", value


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_with_the_values_it_states(path):
    cfg = load_config(path)
    stated = dict(_leaves(yaml.safe_load(path.read_text())))
    assert stated, f"{path.name} states nothing"
    assert {key: _get(cfg, key) for key in stated} == stated


def test_optimiser_defaults_differ_per_section_and_survive_a_partial_block(tmp_path):
    cfg = load_config(None)
    assert cfg.grpo.optim == OptimConfig(learning_rate=1e-6, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
                                         lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=1.0,
                                         max_nonfinite_steps=3)
    assert cfg.sft.optim == OptimConfig(learning_rate=1e-5)
    assert (cfg.grpo.grad_accum_steps, cfg.sft.grad_accum_steps, cfg.grpo.seed, cfg.sft.seed) == (2, 1, 42, 42)
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  optim:\n    weight_decay: 0.1\n")
    cfg = load_config(path, ["grpo.optim.warmup_ratio=0.5"])
    assert cfg.sft.optim.weight_decay == 0.1 and cfg.sft.optim.learning_rate == 1e-5  # SFT's own default kept
    assert cfg.grpo.optim.warmup_ratio == 0.5 and cfg.grpo.optim.learning_rate == 1e-6


def test_an_optimiser_key_outside_its_block_names_the_new_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'grpo\.learning_rate'.*'grpo\.optim\.learning_rate'"):
        load_config(None, ["grpo.learning_rate=1e-5"])
    path = tmp_path / "old.yaml"
    path.write_text("sft:\n  max_grad_norm: 0.5\n")
    moved = r"old\.yaml: unknown config key 'sft\.max_grad_norm'.*now 'sft\.optim\.max_grad_norm'"
    with pytest.raises(ConfigError, match=moved):
        load_config(path)
    with pytest.raises(ConfigError, match=r"grpo\.optim\.learning_rat\b.*did you mean 'learning_rate'"):
        load_config(None, ["grpo.optim.learning_rat=1e-5"])


def test_configs_are_shipped():
    assert {"flowers102_4shot.yaml", "demo.yaml", "tools_digits.yaml"} <= {p.name for p in CONFIGS}


def test_an_unknown_key_on_the_command_line_is_blamed_on_the_command_line():
    """Issue 27, item 5: it read "configs/demo.yaml: unknown config key 'grpo.optim.learnig_rate'"."""
    with pytest.raises(ConfigError) as caught:
        load_config("configs/demo.yaml", ["grpo.optim.learnig_rate=1e-3"])
    assert str(caught.value).startswith("command-line override: unknown config key 'grpo.optim.learnig_rate'")
    assert "demo.yaml" not in str(caught.value)
    # over the file's values: the file's other optimiser settings stay
    assert load_config("configs/demo.yaml", ["grpo.optim.weight_decay=0.1"]).grpo.optim.learning_rate == 3e-4
