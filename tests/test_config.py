"""The config: sections per component, old key names as aliases, resumable fields, checks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from polar_train import config as config_module
from polar_train.config import ALIASES, Config, ConfigError, load_config, resumable_keys, to_dict
from polar_train.rundir import prepare_output_dir, training_differences

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def with_old_names(tree: dict) -> dict:
    """A config mapping written the way configs were before the keys moved (every alias used)."""
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old_key, new_key in ALIASES.items():
        section, key = new_key.split(".")
        if key in old.get(section, {}):
            old.setdefault(old_key.split(".")[0], {})[old_key.split(".")[1]] = old[section].pop(key)
    return {k: v for k, v in old.items() if v != {}}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_config_loads_the_same_under_its_old_key_names(path: Path, tmp_path: Path) -> None:
    tree = yaml.safe_load(path.read_text())
    old = with_old_names(tree)
    assert old != tree and "optimizer" not in old  # the old spelling really is used
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert load_config(tmp_path / "old.yaml") == load_config(path)


def test_old_keys_still_work_and_name_their_new_place_once(caplog: pytest.LogCaptureFixture) -> None:
    config_module._announced.clear()
    overrides = ["train.lr=1e-4", "train.loss=focal", "train.save_steps=7", "train.resume=never", "train.betas=[0.8, 0.9]"]
    with caplog.at_level(logging.WARNING, logger="polar_train"):
        cfg = load_config(REPO / "configs/demo.yaml", overrides)
        load_config(REPO / "configs/demo.yaml", overrides)  # logged once per process
    assert (cfg.optimizer.lr, cfg.loss.kind, cfg.checkpoint.save_steps, cfg.checkpoint.resume) == (1e-4, "focal", 7, "never")
    assert cfg.optimizer.betas == [0.8, 0.9]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["config: renamed keys (the old names still work): train.betas -> optimizer.betas, "
                     "train.loss -> loss.kind, train.lr -> optimizer.lr, train.resume -> checkpoint.resume, "
                     "train.save_steps -> checkpoint.save_steps"]
    assert not {"lr", "loss", "save_steps", "resume", "betas"} & set(to_dict(cfg)["train"])  # moved, not copied


def test_train_precision_is_an_alias_of_engine_precision(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"train": {"precision": "fp16", "epochs": 2},
                                                     "data": {"train_files": ["x"]}, "model": {"path": "m"}}))
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.engine.precision, cfg.train.epochs) == ("fp16", 2)
    assert "precision" not in to_dict(cfg)["train"] and to_dict(cfg)["engine"] == {"precision": "fp16"}
    assert load_config(tmp_path / "c.yaml", ["train.precision=bf16"]).engine.precision == "bf16"
    assert load_config(tmp_path / "c.yaml", ["engine.precision=fp32"]).engine.precision == "fp32"
    assert "engine.precision" in resumable_keys()


def test_an_override_under_the_old_name_beats_the_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"optimizer": {"lr": 0.5}, "data": {"train_files": ["x"]},
                                                     "model": {"path": "m"}}))
    assert load_config(tmp_path / "c.yaml", ["train.lr=0.25"]).optimizer.lr == 0.25
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({"optimizer": {"lr": 0.5}, "train": {"lr": 0.1},
                                                        "data": {"train_files": ["x"]}, "model": {"path": "m"}}))
    with pytest.raises(ConfigError, match=r"train.lr: set twice, also as its new name optimizer.lr \(keep optimizer.lr\)"):
        load_config(tmp_path / "both.yaml")


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "train.lrr: unknown key (did you mean train.lr?)"),
    ("optimizer.betaz=1", "optimizer.betaz: unknown key (did you mean optimizer.betas?)"),
    ("loss.kind=hinge", "loss.kind: 'hinge' is not one of ranking, focal, listwise"),
    ("train.loss=hinge", "train.loss (now loss.kind): 'hinge' is not one of ranking, focal, listwise"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: 4 is not one of 0, 1, 2, 3"),
    ("train.precision=fp8", "train.precision (now engine.precision): 'fp8' is not one of auto, bf16, fp16, fp32"),
    ("schedule.warmup_ratio=1.5", "schedule.warmup_ratio: must be between 0 and 1, got 1.5"),
    ("checkpoint.save_total_limit=0", "checkpoint.save_total_limit: must be > 0, got 0"),
    ("deepspeed.offload_params=true", "deepspeed.offload_params: parameter offload needs deepspeed.zero_stage=3"),
    ("deepspeed.max_live_parameters=0", "deepspeed.max_live_parameters: must be > 0, got 0"),
])
def test_each_problem_names_its_full_dotted_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/demo.yaml", [override])
    assert info.value.what == message


def test_resumable_is_marked_on_the_fields() -> None:
    keys = resumable_keys()
    # launch and bookkeeping: may change when a run continues in its output_dir
    assert {"deepspeed.enabled", "deepspeed.zero_stage", "engine.precision", "train.max_steps", "checkpoint.resume",
            "checkpoint.save_steps", "model.attention", "output_dir"} <= keys
    # what a step trains: may not
    assert not keys & {"optimizer.lr", "schedule.warmup_ratio", "loss.kind", "train.pairs_per_step", "data.max_tokens",
                       "seed", "model.path", "data.train_files"}
    assert keys <= set(config_module._all_keys(Config))  # each names a real field


def test_a_run_folder_written_with_the_old_names_is_the_same_run(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/demo.yaml", [f"output_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(with_old_names(to_dict(cfg))))
    assert training_differences(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()), to_dict(cfg)) == []
    longer = load_config(REPO / "configs/demo.yaml", [f"output_dir={tmp_path / 'run'}", "deepspeed.enabled=true",
                                                       "deepspeed.zero_stage=3", "train.precision=bf16", "train.max_steps=9"])
    prepare_output_dir(tmp_path / "run", to_dict(longer))  # another engine, stage, precision: the same run
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == cfg.optimizer.lr and "lr" not in saved["train"]  # rewritten with the new names
    other = load_config(REPO / "configs/demo.yaml", [f"output_dir={tmp_path / 'run'}", "loss.kind=focal"])
    with pytest.raises(config_module.UserError, match=r"holds a different run \(loss.kind: 'ranking' -> 'focal'\)"):
        prepare_output_dir(tmp_path / "run", to_dict(other))


def test_zero3_caps_the_gathered_parameters_deepspeed_keeps_live() -> None:
    from polar_train.engine.deepspeed import deepspeed_config

    cfg = load_config(REPO / "configs/demo.yaml", ["deepspeed.zero_stage=3", "deepspeed.max_live_parameters=1000"])
    zero = deepspeed_config(cfg.optimizer, cfg.deepspeed, 2, "fp32")["zero_optimization"]
    assert (zero["stage3_max_live_parameters"], zero["stage3_prefetch_bucket_size"]) == (1000, 1000)
    cfg = load_config(REPO / "configs/demo.yaml", ["deepspeed.zero_stage=2"])
    assert "stage3_max_live_parameters" not in deepspeed_config(cfg.optimizer, cfg.deepspeed, 2, "fp32")["zero_optimization"]
