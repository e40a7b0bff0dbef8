"""Typed configs: recipe defaults, YAML and key=value overrides, and a message naming the key for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memobert.config import ConfigError, from_dict, load_config, to_dict, to_yaml
from preprocessing.config import PreprocessConfig
from pretrain.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_pretrain_defaults_are_the_paper_recipe() -> None:
    cfg = load_config(PretrainConfig, overrides=["model.init_from=none"])
    assert cfg.train.global_batch == 640 and cfg.train.micro_batch * cfg.train.grad_accum == 640
    assert cfg.train.steps == 40_000 and cfg.optim.warmup_steps == 4_000
    assert cfg.optim.lr == 5e-5 and cfg.optim.betas == (0.9, 0.98) and cfg.optim.weight_decay == 0.01
    # The authors' clip of 5.0 on the sum of 4 micro-batch means, as a threshold on the averaged gradient.
    assert cfg.optim.grad_clip == 1.25 and cfg.optim.eps == 1e-6 and cfg.model.dropout == 0.1
    assert cfg.model.flavor == "base" and cfg.model.type_vocab_size == 3
    assert (cfg.model.acoustic_dim, cfg.model.visual_dim, cfg.model.vprob_dim) == (768, 342, 8)
    assert (cfg.data.max_text_len, cfg.data.max_visual_len, cfg.data.max_acoustic_len) == (30, 36, 64)
    assert (cfg.mask.word_mask_prob, cfg.mask.visual_mask_ratio, cfg.mask.acoustic_mask_ratio, cfg.mask.span) == (
        0.15,
        0.2,
        0.15,
        3,
    )
    assert cfg.tasks.mode == "one_per_step"
    assert cfg.tasks.ratios == {"wwmlm": 2.0, "spanmvfr": 1.0, "spanmvfckl": 1.0, "spanmafr": 1.0}
    assert cfg.train.zero_stage == 1


def test_preprocess_defaults_are_the_feature_recipe() -> None:
    cfg = load_config(PreprocessConfig)
    assert cfg.segment.min_seconds == 1.0 and cfg.segment.max_seconds == 10.0
    assert cfg.audio.pool == 3 and cfg.audio.sample_rate == 16_000 and cfg.audio.layer == -1
    assert cfg.face.fps == 10.0 and cfg.face.min_confidence == 0.5 and cfg.face.crop_size == 64
    assert cfg.face.min_track_fraction == 0.2 and cfg.face.max_frames == 36


def test_yaml_then_command_line_overrides(tmp_path: Path) -> None:
    override = tmp_path / "o.yaml"
    override.write_text("train:\n  steps: 100\n  micro_batch: 8\n  grad_accum: 2\n  global_batch: 16\noptim:\n  lr: 1e-4\n")
    cfg = load_config(PretrainConfig, [override], ["train.steps=50", "optim.warmup_steps=5", "tasks.ratios.wwmlm=0",
                                                   "model.flavor=debug"])
    assert cfg.train.steps == 50  # the command line wins over YAML
    assert cfg.train.micro_batch == 8 and cfg.optim.lr == 1e-4  # YAML's "1e-4" is a string; coerced
    assert cfg.tasks.ratios["wwmlm"] == 0.0 and cfg.tasks.ratios["spanmafr"] == 1.0  # merged, not replaced
    assert cfg.optim.betas == (0.9, 0.98)


def test_round_trip_through_dict_and_yaml() -> None:
    cfg = load_config(PretrainConfig, overrides=["model.flavor=tiny", "optim.betas=[0.8, 0.9]"])
    assert from_dict(PretrainConfig, to_dict(cfg)) == cfg
    assert from_dict(PretrainConfig, yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["trian.steps=3"], "unknown config key 'trian'"),
        (["train.steps=many"], "'train.steps' must be an integer"),
        (["train.steps=1.5"], "'train.steps' must be an integer"),
        (["model.flavor=huge"], "'model.flavor' must be one of"),
        (["train.zero_stage=4"], "'train.zero_stage' must be one of"),
        (["optim.lr=-1"], "'optim.lr'"),
        (["train.global_batch=100"], "'train.global_batch'"),
        (["train=3"], "'train' is a section"),
        (["tasks.ratios.itm=1"], "'tasks.ratios.itm'"),
        (["optim.warmup_steps=50000"], "'optim.warmup_steps'"),
        (["mask.span=0"], "'mask.span'"),
        (["train.profile_steps=[5,2]"], "'train.profile_steps'"),
        (["train.profile_steps=5"], "'train.profile_steps'"),
        (["train.stop_at=0"], "'train.stop_at'"),
        (["train.val_batches=0"], "'train.val_batches'"),
        (["optim.grad_clip=-1"], "'optim.grad_clip'"),
        (["optim.weight_decay=-0.1"], "'optim.weight_decay'"),
        (["noequals"], "not of the form key=value"),
    ],
)
def test_bad_config_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(PretrainConfig, overrides=overrides)


def test_base_flavor_needs_init_from_or_an_explicit_none(tmp_path: Path) -> None:
    for overrides in ([], ["model.init_from=null"]):
        with pytest.raises(ConfigError, match="'model.init_from'.*model.init_from=none"):
            load_config(PretrainConfig, overrides=overrides)
    assert load_config(PretrainConfig, overrides=["model.init_from=none"]).model.text_bert is None
    assert load_config(PretrainConfig, overrides=["model.init_from=bert"]).model.text_bert == "bert"
    bundled = Path(load_config(PretrainConfig, overrides=["model.init_from=bundled"]).model.text_bert)
    assert (bundled / "config.json").is_file() and (bundled / "vocab.txt").is_file()  # the offline MiniLM folder
    assert load_config(PretrainConfig, overrides=["model.flavor=debug"]).model.text_bert is None  # small flavors may start random
    spelled = tmp_path / "random.yaml"
    spelled.write_text("model:\n  init_from: none\n")  # YAML reads none as a string, null as unset
    assert load_config(PretrainConfig, [spelled]).model.init_from == "none"


def test_bad_yaml_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(PretrainConfig, [missing])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(PretrainConfig, [broken])
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(PretrainConfig, [listing])


def test_shipped_yaml_files_hold_only_valid_overrides() -> None:
    from memobert.cli import config_classes

    classes = config_classes()

    # The ZeRO files are overlays on a full run's file (--config memobert_base.yaml --config zero2.yaml).
    overlays = {REPO / "configs/pretrain" / name: REPO / "configs/pretrain/memobert_base.yaml" for name in ("zero2.yaml", "zero3.yaml")}
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "configs/ holds no YAML files"
    for path in files:
        folder = path.relative_to(REPO / "configs").parts[0]
        assert folder in classes, f"{path}: no config class for configs/{folder}/"
        base = [overlays[path]] if path in overlays else []
        load_config(classes[folder], [*base, path])  # raises on an unknown key or bad value


def test_cli_print_config_and_error_exit(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "memobert.cli", "synth", "--out", str(tmp_path / "x")]
    shown = subprocess.run([*run, "--seed", "7", "--print-config"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(shown.stdout)["seed"] == 7
    assert not (tmp_path / "x").exists()  # printing the config does no work
    bad = subprocess.run([*run, "sed=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown config key 'sed'" in bad.stderr
    assert not (tmp_path / "x").exists()  # a bad config fails before any work
