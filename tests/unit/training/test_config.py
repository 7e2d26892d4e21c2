from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, TrainConfig, dump_config, from_dict, load_config


def test_defaults_follow_listing_1() -> None:
    cfg = TrainConfig()
    assert (cfg.optim.disc_lr_mult, cfg.optim.cls_lr_mult) == (0.5, 0.05)
    assert (cfg.optim.step_size, cfg.optim.gamma) == (30, 0.5)
    assert cfg.model.prior == "gaussian" and cfg.method.name == "er"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: fashion-mnist\n  batch_size: 64\nrun:\n  epochs: 3\n")
    cfg = load_config(
        path, {"run.epochs": "7", "adv.eps": "0.1", "model.embed_dim": 8, "run.compile": "true"}
    )
    assert cfg.data.dataset == "fashion-mnist" and cfg.data.batch_size == 64
    assert cfg.run.epochs == 7 and cfg.adv.eps == 0.1 and cfg.model.embed_dim == 8 and cfg.run.compile is True


def test_frozen() -> None:
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.run.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"run.epoch": 3}, "unknown config key run.epoch"),
        ({"train.epochs": 3}, "unknown config section"),
        ({"run.epochs": "three"}, "run.epochs: expected int"),
        ({"run.epochs": None}, "may not be null"),
        ({"adv.eps": True}, "adv.eps"),
        ({"epochs": 3}, "section.field"),
    ],
)
def test_bad_overrides_name_the_key(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_round_trip_through_yaml() -> None:
    import yaml

    cfg = load_config(overrides={"model.width": 0.25, "data.train_subset": 100})
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_shipped_configs_load(repo_root: Path) -> None:
    files = sorted((repo_root / "training" / "configs").glob("*.yaml"))
    assert files, "the package ships example configs"
    for f in files:
        load_config(f)


def test_image_folder_keys_and_embed_dim_auto() -> None:
    from training.config import training_eps
    from training.train import validate

    cfg = load_config(
        overrides={"data.dataset": "folder:/data/pets", "data.image_size": "64x48", "model.embed_dim": "auto"}
    )
    assert cfg.data.image_size == "64x48" and cfg.model.embed_dim == "auto"
    assert load_config(overrides={"model.embed_dim": "8"}).model.embed_dim == 8
    with pytest.raises(ConfigError, match=r"adv\.eps: required for an image folder"):
        validate(cfg)  # no silent default for unknown data
    with pytest.raises(ConfigError, match="folder:/data/pets has no default training eps"):
        training_eps(cfg, cfg.data.dataset)
    validate(load_config(overrides={"data.dataset": "folder:/data/pets", "adv.eps": "0.05"}))
    assert training_eps({"adv": {"eps": 0.05}}, "folder:/data/pets") == 0.05
    with pytest.raises(ConfigError, match=r"model\.embed_dim: a positive integer or 'auto'"):
        validate(load_config(overrides={"model.embed_dim": "big"}))
