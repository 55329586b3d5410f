"""Params are validated once, at the edge, with one message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted((REPO / "params").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_validates(preset: Path) -> None:
    cfg = load_config(preset)
    assert cfg.name == preset.stem
    assert 0 < cfg.train.t0 <= cfg.train.steps


@pytest.mark.parametrize("data, field", [
    ({"train": {"lr": -1}}, "train.lr"),
    ({"trian": {}}, "trian"),
    ({"train": {"stepz": 3}}, "train.stepz"),
    ({"sparsity": {"n": 4, "m": 4}}, "sparsity.n"),
    ({"train": {"steps": 10, "t0_steps": 20}}, "train.t0_steps"),
    ({"train": {"steps": "ten"}}, "train.steps"),
    ({"evaluate": {"zero_shot": {"enabled": True, "tasks": []}}}, "zero_shot.tasks"),
    ({"evaluate": {"zero_shot": {"tasks": ["mmlu"]}}}, "mmlu"),
    ({"teacher_cache": {"format": "full"}}, "teacher_cache.format"),
    ({"train": {"method": "magic"}}, "train.method"),
    ({"train": {"lr": 1e-4, "min_lr": 1e-3}}, "train.min_lr"),
])
def test_bad_value_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"name": "x", **data}, "p.yaml")
    assert field in str(exc.value)
    assert str(exc.value).startswith("p.yaml:")


def test_overrides_apply_and_are_validated() -> None:
    cfg = parse_config({"name": "x"}, overrides=["train.steps=12", "train.t0_steps=3"])
    assert (cfg.train.steps, cfg.train.t0) == (12, 3)
    with pytest.raises(ConfigError, match="train.lr"):
        parse_config({"name": "x"}, overrides=["train.lr=-0.1"])


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_default_t0_is_a_quarter_of_the_steps() -> None:
    assert parse_config({"name": "x", "train": {"steps": 400}}).train.t0 == 100


def test_exponent_floats_read_as_numbers_and_bools_are_not_ints() -> None:
    cfg = parse_config({"name": "x"}, overrides=["train.lr=2e-4", "train.lambda_max=1e-3"])
    assert cfg.train.lr == 2e-4 and cfg.train.lambda_max == 1e-3
    with pytest.raises(ConfigError, match="train.steps"):
        parse_config({"name": "x", "train": {"steps": True}})


def test_wanda_refresh_applies_only_to_methods_that_refresh() -> None:
    from tasks.config import TrainConfig
    assert TrainConfig(method="ast-naive", refresh_score="wanda").wanda_refresh
    assert not TrainConfig(method="naive", refresh_score="wanda").wanda_refresh  # its mask never refreshes
    assert TrainConfig(method="ast-boosted").wanda_refresh  # the default, from the fair ladder's validation ppl
    assert not TrainConfig(method="ast-boosted", refresh_score="magnitude").wanda_refresh  # the paper's text
