"""HF export and loading: file set, config keys, shards + index, round trip, clear load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polar_train.errors import UserError
from polar_train.model import InternLM2RewardModel, ModelConfig, VarlenMeta, load_model, parse_size, save_model
from polar_train.model import hf

REMOTE_CODE = ("modeling_internlm2.py", "configuration_internlm2.py", "tokenization_internlm2.py",
               "tokenization_internlm2_fast.py")
TOKENIZER = ("tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "generation_config.json")


def make_base(root: Path) -> tuple[Path, InternLM2RewardModel]:
    """A fake base checkpoint folder and a fresh tiny model built from its config.json."""
    base = root / "base"
    base.mkdir()
    cfg = ModelConfig.fresh(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=64, reward_token_id=63)
    raw = {**cfg.raw, "custom_key": {"kept": [1, 2]}, "transformers_version": "4.49.0"}
    (base / "config.json").write_text(json.dumps(raw))
    for name in REMOTE_CODE:
        (base / name).write_text(f"# fake {name}\n")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x", "y"]}}))
    (base / "tokenizer.model").write_bytes(b"\x00\x01fake-sentencepiece")
    (base / "special_tokens_map.json").write_text("{}")
    (base / "generation_config.json").write_text("{}")
    (base / "README.md").write_text("not copied")
    (base / "model.safetensors").write_bytes(b"stale weights, not copied")
    model = InternLM2RewardModel(ModelConfig.from_file(base / "config.json"))
    model.init_weights(seed=0)
    return base, model


def rewards(model: InternLM2RewardModel) -> torch.Tensor:
    lens = [5, 12, 1]
    ids = torch.arange(sum(lens)) % 63
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        return model(ids, pos, VarlenMeta.from_lengths(lens), torch.tensor(lens).cumsum(0) - 1)


def test_export_file_set_config_and_round_trip(tmp_path):
    base, model = make_base(tmp_path)
    out = save_model(model, tmp_path / "export", base_dir=base)

    shard = "model-00001-of-00001.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", shard, "model.safetensors.index.json", *REMOTE_CODE, *TOKENIZER, "README.md"])
    assert (out / "README.md").read_text() != "not copied"  # our model card, not the base's
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert not list(tmp_path.glob("export.*"))  # no tmp / old folders left behind

    base_cfg = json.loads((base / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert set(base_cfg) <= set(cfg)
    for key in base_cfg:
        if key != "torch_dtype":
            assert cfg[key] == base_cfg[key], key
    assert cfg["torch_dtype"] == "float32" and cfg["reward_token_id"] == 63
    assert cfg["architectures"] == ["InternLM2ForRewardModel"]
    assert cfg["auto_map"]["AutoModel"] == "modeling_internlm2.InternLM2ForRewardModel"

    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert index["weight_map"] == {name: shard for name in state}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    with safe_open(str(out / shard), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {k: tuple(v.shape) for k, v in state.items()}

    loaded = load_model(out)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, state[name]), name
    assert torch.equal(rewards(loaded), rewards(model))


def test_sharded_export_loads_back(tmp_path):
    base, model = make_base(tmp_path)
    out = save_model(model, tmp_path / "export", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    for s in shards:  # each shard holds at most 20 kB unless a single tensor is bigger
        tensors = load_file(out / s)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
    loaded = load_model(out)
    assert torch.equal(rewards(loaded), rewards(model))
    card = (out / "README.md").read_text()
    assert "polar-train score" in card
    assert "trust_remote_code" not in card  # auto_map names modeling_internlm2.py, which is not there


def test_bf16_export_and_overwrite(tmp_path):
    base, model = make_base(tmp_path)
    out = tmp_path / "export"
    save_model(model, out)
    save_model(model, out, base_dir=base, dtype=torch.bfloat16)  # replaces the first export
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert (out / "modeling_internlm2.py").is_file()
    loaded = load_model(out, dtype=None)
    assert loaded.v_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.v_head.weight, model.v_head.weight.bfloat16())
    assert not list(tmp_path.glob("export.*"))


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    base, model = make_base(tmp_path)
    out = save_model(model, tmp_path / "export")
    before = sorted(p.name for p in out.iterdir())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out, base_dir=base)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not list(tmp_path.glob("export.*"))
    load_model(out)


def test_legacy_pytorch_model_bin_loads(tmp_path):
    base, model = make_base(tmp_path)
    (base / "model.safetensors").unlink()
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    assert torch.equal(rewards(load_model(base)), rewards(model))


# --- load errors ------------------------------------------------------------------------------


def write_weights(folder: Path, state: dict[str, torch.Tensor]) -> None:
    (folder / "model.safetensors").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def test_load_errors_name_the_problem(tmp_path):
    base, model = make_base(tmp_path)
    state = dict(model.state_dict())

    with pytest.raises(UserError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(empty)
    (base / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model weights found"):
        load_model(base)

    write_weights(base, {k: v for k, v in state.items() if k != "model.layers.1.ffn_norm.weight"})
    with pytest.raises(UserError, match=r"missing: model\.layers\.1\.ffn_norm\.weight"):
        load_model(base)

    write_weights(base, {**state, "model.layers.0.attention.wqkv.bias": torch.zeros(64)})
    with pytest.raises(UserError, match=r"unexpected tensor\(s\): model\.layers\.0\.attention\.wqkv\.bias"):
        load_model(base)

    write_weights(base, {**state, "model.layers.0.attention.wo.weight": torch.zeros(32, 16)})
    with pytest.raises(UserError, match=r"'model\.layers\.0\.attention\.wo\.weight' has shape \[32, 16\].*\[32, 32\]"):
        load_model(base)

    write_weights(base, state)
    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()),
                                                  "intermediate_size": 48}))
    with pytest.raises(UserError, match=r"feed_forward\.w1\.weight' has shape \[64, 32\].*\[48, 32\]"):
        load_model(base)


def test_missing_v_head_needs_the_explicit_flag(tmp_path):
    base, model = make_base(tmp_path)
    lm = {k: v for k, v in model.state_dict().items() if k != "v_head.weight"}
    write_weights(base, {**lm, "output.weight": torch.zeros(64, 32)})
    with pytest.raises(UserError, match="allow_missing_v_head"):
        load_model(base)
    loaded = load_model(base, allow_missing_v_head=True)
    assert loaded.v_head.weight.abs().sum() > 0
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)


def test_sharded_index_with_a_missing_shard(tmp_path):
    base, model = make_base(tmp_path)
    out = save_model(model, tmp_path / "export", max_shard_size="20KB")
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(UserError, match=victim.name):
        load_model(out)


def test_reading_a_checkpoint_lazily(tmp_path):
    """The public reader: weight files, header-only shapes (shards and legacy .bin), one tensor at a time."""
    from contextlib import ExitStack

    base, model = make_base(tmp_path)
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    out = save_model(model, tmp_path / "export", max_shard_size="20KB")
    kind, files = hf.weight_files(out)
    assert kind == "safetensors" and len(files) > 1 and files == sorted(out.glob("model-*.safetensors"))
    assert hf.checkpoint_shapes(out) == expected
    with ExitStack() as stack:
        reader = hf.WeightReader(kind, files, stack)
        assert reader.shapes() == expected
        assert torch.equal(reader.get("v_head.weight"), state["v_head.weight"])

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(dict(state), legacy / "pytorch_model.bin")
    assert hf.weight_files(legacy) == ("bin", [legacy / "pytorch_model.bin"])
    assert hf.checkpoint_shapes(legacy) == expected

    assert hf.check_checkpoint_folder(out).hidden_size == 32
    with pytest.raises(UserError, match=r"model folder not found \(model\.path\)"):
        hf.check_checkpoint_folder(tmp_path / "nope", key="model.path")
    with pytest.raises(UserError, match=r"is not a folder \(model\.path\)"):
        hf.check_checkpoint_folder(files[0], key="model.path")
    with pytest.raises(UserError, match=r"^[^(]*: is not a folder \(give"):
        hf.check_checkpoint_folder(files[0])
    with pytest.raises(UserError, match=r"no config.json in the model folder \(model\.path\)"):
        hf.check_checkpoint_folder(tmp_path, key="model.path")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(" 64 kib ") == 64 * 1024
    assert parse_size(123) == 123
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(UserError, match="max_shard_size"):
            parse_size(bad)


# --- fidelity to a sharded base with remote code, and the additions ----------------------------


def make_sharded_base(root: Path, tokenizer_dir: Path, model: InternLM2RewardModel) -> Path:
    """A base folder as published checkpoints look: two shards + index (split by hand), remote-code
    *.py files and ``auto_map``, extra config keys, the tokenizer, a README of its own."""
    base = root / "POLAR-tiny-Base"
    base.mkdir()
    state = model.state_dict()
    first = [k for k in state if k.startswith(("model.tok_embeddings.", "model.layers.0."))]
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": [k for k in state if k not in first]}
    for file, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, str(base / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 4 * sum(t.numel() for t in state.values())},
             "weight_map": {k: file for file, names in shards.items() for k in names}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    (base / "config.json").write_text(json.dumps({**model.config.raw, "custom_key": [1], "transformers_version": "4.49.0"}))
    for name in REMOTE_CODE:
        (base / name).write_text(f"# fake {name}\n")
    for f in tokenizer_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    (base / "README.md").write_text("# POLAR-tiny-Base\n")
    return base


def test_export_keeps_the_base_layout_and_rewards(tmp_path, repo_root, sharp_tiny_model):
    import yaml

    from polar_train.scoring import score_rows
    from polar_train.tokenizer import load_tokenizer

    base = make_sharded_base(tmp_path, repo_root / "data" / "tokenizer",
                             sharp_tiny_model(seed=3, num_layers=3, intermediate_size=128))
    model = load_model(base)
    sizes = [t.numel() * 4 for t in model.state_dict().values()]
    training_config = {"model": {"path": base}, "train": {"lr": 1e-5, "betas": (0.9, 0.95)}}
    report = {"pairs": 200, "accuracy": 0.875, "mean_margin": 1.25, "reward_mean": -0.5, "reward_std": 2.0,
              "num_dropped": 3, "chosen": {"mean": 0.1, "std": 1.0, "p5": -1.0, "p50": 0.1, "p95": 1.2}}
    out = save_model(model, tmp_path / "export", base_dir=base, max_shard_size=sum(sizes) // 2 + max(sizes),
                     training_config=training_config, eval_report=report)

    # the same files as the base, plus the documented additions (README.md is ours, not the base's)
    assert sorted(p.name for p in out.iterdir()) == sorted({p.name for p in base.iterdir()} | {"training_config.yaml"})
    for f in base.iterdir():
        if f.suffix == ".py" or f.name.startswith("tokenizer"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name

    def tensors(folder: Path) -> dict[str, tuple[int, ...]]:
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        shapes = {}
        for file in set(weight_map.values()):
            with safe_open(str(folder / file), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        assert set(shapes) == set(weight_map)
        return shapes

    assert tensors(out) == tensors(base)
    base_cfg, cfg = json.loads((base / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert set(cfg) == set(base_cfg)  # torch_dtype and reward_token_id were already there
    assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == {k: v for k, v in base_cfg.items() if k != "torch_dtype"}

    assert yaml.safe_load((out / "training_config.yaml").read_text()) == {
        "model": {"path": str(base)}, "train": {"lr": 1e-5, "betas": [0.9, 0.95]}}
    card = (out / "README.md").read_text()
    assert "AutoModel.from_pretrained" in card and "trust_remote_code=True" in card
    assert "polar-train score --model" in card and "POLAR-tiny-Base" in card
    assert "| accuracy | 0.8750 |" in card and "| num_dropped | 3 |" in card

    rows = [{"prompt": "What is the capital of China?", "reference": "Beijing.", "output": o}
            for o in ("Beijing.", "Shanghai.", "It is Beijing.")]
    tokenizer = load_tokenizer(out)
    exported = load_model(out)
    assert [r["reward"] for r in score_rows(exported, tokenizer, rows)] == [
        r["reward"] for r in score_rows(model, load_tokenizer(base), rows)]
    for name, t in exported.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
