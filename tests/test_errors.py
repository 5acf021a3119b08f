"""Bad input -> one clear line, a non-zero exit, nothing lost (issue 6, items 1-3).

Each case runs through ``polar_train.cli.main`` (a few through a real ``python -m polar_train``)
and checks three things: the exit code (2 for a user mistake, 1 for the machine or a failure
inside training), the location in the message (``FILE:LINE``, a dotted config key or a path)
and that no traceback is printed. The run-directory checks (``polar_train.rundir``) are also
tested directly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polar_train import cli, rundir, scoring
from polar_train.config import Config, load_config, to_dict
from polar_train.data import SkippedRow
from polar_train.errors import UserError
from polar_train.model import InternLM2RewardModel, ModelConfig, save_model
from polar_train.store_build import load_pair_store
from polar_train.tokenizer import REWARD_TOKEN, SEP_TOKEN, build_tokenizer, save_tokenizer

from conftest import TINY_TEXTS

GOOD = {"prompt": "What is 7 + 5?", "reference": "12", "chosen": "The answer is 12.", "rejected": "It is 13."}


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet_logger():
    """cli.main points the polar_train logger at the (captured) stderr of the test; drop it after."""
    yield
    logger = logging.getLogger("polar_train")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


def write_lines(path: Path, lines: list[str | bytes | dict]) -> Path:
    data = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        data += (line if isinstance(line, bytes) else line.encode()) + b"\n"
    path.write_bytes(data)
    return path


def preflight(cfg: Config) -> None:
    rundir.preflight(cfg.data, cfg.model, cfg.deepspeed)


def prepare_output_dir(out: Path, cfg: Config) -> None:
    rundir.prepare_output_dir(out, to_dict(cfg))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, expected_code: int, *where: str) -> str:
    """The exit code, ``polar-train: error: <where>...`` on the error line, no traceback."""
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("polar-train: error: ")]
    assert len(lines) == 1, err
    message = err[err.index("polar-train: error: "):]
    for w in where:
        assert w in message, (w, message)
    return message


def base_args(tmp_path: Path, tokenizer: Path, train_file: Path, *extra: str) -> list[str]:
    """Overrides for a tiny fresh-model run on ``train_file``, no cache, no eval."""
    return [
        f"output_dir={tmp_path / 'run'}", f"model.fresh.tokenizer={tokenizer}", f"data.train_files={train_file}",
        "data.eval_files=[]", "data.cache_dir=", "data.max_length=256", "data.max_tokens=1024",
        "model.fresh.hidden_size=16", "model.fresh.num_layers=1", "model.fresh.num_heads=2",
        "model.fresh.num_kv_heads=1", "model.fresh.intermediate_size=32",
        "train.pairs_per_step=2", "train.max_steps=1", "train.eval_steps=0", *extra,
    ]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_path: Path, tiny_tokenizer) -> Path:
    """A tiny HF reward checkpoint (config.json + safetensors + tokenizer files)."""
    config = ModelConfig.fresh(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=32, vocab_size=len(tiny_tokenizer), reward_token_id=4)
    model = InternLM2RewardModel(config)
    model.init_weights(0)
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny", base_dir=tiny_tokenizer_path)


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --- 1. Data: each problem named with FILE:LINE, through `polar-train data` --------------------

BAD_LINES = {
    "malformed JSON": ('{"prompt": "x", "reference": "y", "chosen": "z"', "invalid JSON"),
    "missing field": (json.dumps({k: v for k, v in GOOD.items() if k != "rejected"}), "field 'rejected' is missing"),
    "wrong type": (json.dumps({**GOOD, "chosen": 12}), "field 'chosen' is of type integer"),
    "message without content": (json.dumps({**GOOD, "prompt": [{"role": "user"}]}), "message 1 has no 'content'"),
    "undecodable bytes": (b'{"prompt": "x\xff", "reference": "y", "chosen": "z", "rejected": "w"}', "not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_row_is_named_with_file_and_line(case, tmp_path, capsys, repo_root, tiny_tokenizer_path):
    line, what = BAD_LINES[case]
    data = write_lines(tmp_path / "train.jsonl", [GOOD, line, GOOD])
    code, err = run_cli(capsys, "data", repo_root / "configs/demo.yaml", *base_args(tmp_path, tiny_tokenizer_path, data))
    message = assert_one_error(code, err, 2, f"{data}:2: ", what)
    assert "data.on_error=skip" in message


@pytest.mark.parametrize("case", ["empty file", "no pair fits"])
def test_file_level_data_errors_name_the_file(case, tmp_path, capsys, repo_root, tiny_tokenizer_path):
    if case == "empty file":
        data = write_lines(tmp_path / "train.jsonl", ["", "  "])
        extra, what = [], "no rows"
    else:
        data = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD])
        extra, what = ["data.max_length=12"], "no pair fits max_length=12"
    code, err = run_cli(capsys, "data", repo_root / "configs/demo.yaml", *base_args(tmp_path, tiny_tokenizer_path, data, *extra))
    assert_one_error(code, err, 2, f"{data}: ", what)


def test_bad_row_through_train_in_a_subprocess(tmp_path, repo_root, tiny_tokenizer_path):
    data = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD, BAD_LINES["wrong type"][0]])
    args = [sys.executable, "-m", "polar_train", "train", str(repo_root / "configs/demo.yaml"),
            *base_args(tmp_path, tiny_tokenizer_path, data)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "POLAR_TRAIN_DEBUG": ""})
    assert_one_error(proc.returncode, proc.stderr, 2, f"{data}:3: ", "field 'chosen'")
    assert not (tmp_path / "run" / "hf").exists()


def test_skip_keeps_every_skipped_row_also_through_the_cache(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    bad = [BAD_LINES["missing field"][0]] * 7
    data = write_lines(tmp_path / "train.jsonl", [GOOD, *bad, GOOD])
    kwargs = dict(max_length=256, cache_dir=str(tmp_path / "cache"), on_error="skip")
    _, stats = load_pair_store([str(data)], tiny_tokenizer, str(tiny_tokenizer_path), **kwargs)
    _, cached = load_pair_store([str(data)], tiny_tokenizer, str(tiny_tokenizer_path), **kwargs)
    assert cached.cache_hit and not stats.cache_hit
    for s in (stats, cached):
        assert s.num_skipped == 7 and [r.source for r in s.skipped] == [f"{data}:{n}" for n in range(2, 9)]
    assert len(stats.as_dict()["skipped"]) == 5  # reports show the first few


def test_write_skipped_rows_lists_every_row(tmp_path, caplog):
    rows = [SkippedRow(f"a.jsonl:{n}", "invalid JSON") for n in range(2, 10)]
    with caplog.at_level(logging.WARNING, logger="polar_train"):
        logging.getLogger("polar_train").propagate = True
        try:
            path = rundir.write_skipped_rows(tmp_path, {"train": rows, "eval": [SkippedRow("b.jsonl:1", "no 'content'")]})
        finally:
            logging.getLogger("polar_train").propagate = False
    assert path == tmp_path / "skipped_rows.jsonl"
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(written) == 9
    assert written[0] == {"split": "train", "source": "a.jsonl:2", "reason": "invalid JSON"}
    assert written[-1] == {"split": "eval", "source": "b.jsonl:1", "reason": "no 'content'"}
    assert "9 bad rows skipped" in caplog.text and "a.jsonl:2, a.jsonl:3" in caplog.text
    assert rundir.write_skipped_rows(tmp_path, {"train": []}) is None
    assert not path.exists()  # a stale list from an earlier attempt is removed


def test_train_with_skip_writes_skipped_rows(tmp_path, capsys, repo_root, tiny_tokenizer_path):
    data = write_lines(tmp_path / "train.jsonl", [GOOD, BAD_LINES["malformed JSON"][0], GOOD, GOOD])
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml",
                        *base_args(tmp_path, tiny_tokenizer_path, data, "data.on_error=skip"))
    assert code == 0, err
    written = [json.loads(line) for line in (tmp_path / "run" / "skipped_rows.jsonl").read_text().splitlines()]
    assert written == [{"split": "train", "source": f"{data}:2", "reason": written[0]["reason"]}]
    assert "invalid JSON" in written[0]["reason"]


# --- 2. Config: unknown / mistyped keys with the dotted key -----------------------------------


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "train", tmp_path / "nope.yaml")
    assert_one_error(code, err, 2, f"{tmp_path / 'nope.yaml'}: config file not found")


@pytest.mark.parametrize("override, where, hint", [
    ("data.train_fils=x.jsonl", "data.train_fils", "did you mean data.train_files?"),
    ("train.lr=fast", "train.lr (now optimizer.lr)", "expected a number"),
    ("optimizer.lr=fast", "optimizer.lr", "expected a number"),
    ("data.on_error=ignore", "data.on_error", "raise, skip"),
])
def test_config_problem_names_the_dotted_key(override, where, hint, tmp_path, capsys, repo_root):
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml", override)
    assert_one_error(code, err, 2, where, hint)


def test_config_errors_in_a_subprocess(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "-m", "polar_train", "data", str(repo_root / "configs/demo.yaml"), "train.lrr=1"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "POLAR_TRAIN_DEBUG": ""})
    assert_one_error(proc.returncode, proc.stderr, 2, "train.lrr", "did you mean train.lr?")
    proc = subprocess.run([sys.executable, "-m", "polar_train", "--debug", "train", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" in proc.stderr  # --debug shows it


# --- 3. Files: model folder, weights, tokenizer, shapes, output dir --------------------------


def test_missing_model_folder(tmp_path, capsys, repo_root, tiny_tokenizer_path):
    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    missing = tmp_path / "no-such-model"
    cfg = load_config(repo_root / "configs/demo.yaml", base_args(tmp_path, tiny_tokenizer_path, data, f"model.path={missing}"))
    with pytest.raises(UserError, match="model folder not found"):
        preflight(cfg)
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml",
                        *base_args(tmp_path, tiny_tokenizer_path, data, f"model.path={missing}"))
    assert_one_error(code, err, 2, str(missing), "not found")


def test_folder_without_weights(tmp_path, capsys, repo_root, tiny_model_dir, tiny_tokenizer_path):
    model = copy_dir(tiny_model_dir, tmp_path / "model")
    for f in model.glob("model*.safetensors*"):
        f.unlink()
    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    args = base_args(tmp_path, tiny_tokenizer_path, data, f"model.path={model}")
    with pytest.raises(UserError, match="no model weights found") as info:
        preflight(load_config(repo_root / "configs/demo.yaml", args))
    assert info.value.where == str(model)
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml", *args)
    assert_one_error(code, err, 2, f"{model}: no model weights found")


def test_shapes_that_do_not_match_config(tmp_path, capsys, repo_root, tiny_model_dir, tiny_tokenizer_path):
    model = copy_dir(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    args = base_args(tmp_path, tiny_tokenizer_path, data, f"model.path={model}")
    with pytest.raises(UserError, match=r"feed_forward.w\d.weight' has shape") as info:
        preflight(load_config(repo_root / "configs/demo.yaml", args))
    assert str(model) in info.value.where
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml", *args)
    assert_one_error(code, err, 2, str(model), "has shape", "config.json implies")


def test_preflight_reads_only_headers_and_accepts_a_good_checkpoint(tmp_path, repo_root, tiny_model_dir, tiny_tokenizer_path):
    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    cfg = load_config(repo_root / "configs/demo.yaml", base_args(tmp_path, tiny_tokenizer_path, data, f"model.path={tiny_model_dir}"))
    preflight(cfg)  # no error
    model = copy_dir(tiny_model_dir, tmp_path / "model")
    shard = next(model.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:20])  # a truncated download
    with pytest.raises(UserError, match="not a valid safetensors file") as info:
        preflight(load_config(repo_root / "configs/demo.yaml", [f"model.path={model}", f"data.train_files={data}"]))
    assert info.value.where == str(shard)


@pytest.mark.parametrize("missing_token", [SEP_TOKEN, REWARD_TOKEN])
def test_tokenizer_without_a_special_token(missing_token, tmp_path, capsys, repo_root):
    folder = tmp_path / "tok"
    kept = tuple(t for t in (SEP_TOKEN, REWARD_TOKEN) if t != missing_token)
    save_tokenizer(build_tokenizer(TINY_TEXTS, vocab_size=300, extra_special_tokens=kept), folder)
    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    with pytest.raises(UserError, match=f"has no token '{missing_token}'".replace("[", r"\[").replace("|", r"\|")):
        preflight(load_config(repo_root / "configs/demo.yaml", base_args(tmp_path, folder, data)))
    code, err = run_cli(capsys, "data", repo_root / "configs/demo.yaml", *base_args(tmp_path, folder, data))
    assert_one_error(code, err, 2, str(folder), f"has no token '{missing_token}'")


def test_preflight_data_files(tmp_path, repo_root, tiny_tokenizer_path):
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    empty = write_lines(tmp_path / "empty.jsonl", [])
    cases = {
        f"data.train_files={tmp_path / 'nope.jsonl'}": (str(tmp_path / "nope.jsonl"), "not found (data.train_files)"),
        f"data.eval_files={tmp_path / 'nope.jsonl'}": (str(tmp_path / "nope.jsonl"), "not found (data.eval_files)"),
        f"data.train_files={empty}": (str(empty), "is empty"),
        f"data.train_files={tmp_path}": (str(tmp_path), "is not a file"),
    }
    for override, (where, what) in cases.items():
        cfg = load_config(repo_root / "configs/demo.yaml", [*base_args(tmp_path, tiny_tokenizer_path, good), override])
        with pytest.raises(UserError, match=what.replace("(", r"\(").replace(")", r"\)")) as info:
            preflight(cfg)
        assert info.value.where == where


def test_missing_data_file_fails_before_the_model_is_built(tmp_path, capsys, repo_root, tiny_tokenizer_path):
    missing = tmp_path / "nope.jsonl"
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml", *base_args(tmp_path, tiny_tokenizer_path, missing))
    assert_one_error(code, err, 2, str(missing), "data.train_files")
    assert "fresh model" not in err  # nothing heavy ran


# --- the output directory ---------------------------------------------------------------------


def test_output_dir_holding_a_different_run(tmp_path, repo_root, tiny_tokenizer_path):
    out = tmp_path / "run"
    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    args = base_args(tmp_path, tiny_tokenizer_path, data)
    cfg = load_config(repo_root / "configs/demo.yaml", args)
    prepare_output_dir(out, cfg)
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"]["lr"] == cfg.optimizer.lr

    prepare_output_dir(out, cfg)  # the same config: a resume
    longer = load_config(repo_root / "configs/demo.yaml", [*args, "train.max_steps=50", "train.log_steps=7", "train.resume=never",
                                                            "model.attention=sdpa", "data.cache_dir=/tmp/c", "train.save_steps=5"])
    prepare_output_dir(out, longer)  # only keys that do not change what is trained
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 50

    other = load_config(repo_root / "configs/demo.yaml", [*args, "train.lr=1e-4", "seed=7", "data.max_length=300"])
    with pytest.raises(UserError) as info:
        prepare_output_dir(out, other)
    error = info.value
    assert error.where == str(out) and error.exit_code == 2
    assert "seed: 0 -> 7" in error.what and "data.max_length: 256 -> 300" in error.what
    assert f"optimizer.lr: {cfg.optimizer.lr!r} -> 0.0001" in error.what
    assert error.fix == "use a new output_dir or restore the old value"
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0  # the old run's config is kept


def test_output_dir_that_is_not_a_run(tmp_path, repo_root, tiny_tokenizer_path):
    cfg = load_config(repo_root / "configs/demo.yaml", base_args(tmp_path, tiny_tokenizer_path, tmp_path / "x.jsonl"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"not empty and holds no config.yaml \(found: weights.safetensors\)"):
        prepare_output_dir(tmp_path / "busy", cfg)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        prepare_output_dir(tmp_path / "file", cfg)
    (tmp_path / "empty").mkdir()
    prepare_output_dir(tmp_path / "empty" / "deeper", cfg)
    assert (tmp_path / "empty" / "deeper" / "config.yaml").is_file()


def test_train_refuses_an_output_dir_of_a_different_run(tmp_path, capsys, repo_root, tiny_tokenizer_path):
    data = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD])
    args = base_args(tmp_path, tiny_tokenizer_path, data)
    prepare_output_dir(tmp_path / "run", load_config(repo_root / "configs/demo.yaml", args))
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml", *args, "train.lr=0.5")
    assert_one_error(code, err, 2, str(tmp_path / "run"), "optimizer.lr", "-> 0.5", "use a new output_dir")


# --- 1. The machine: OSError and out-of-memory become one line, exit 1 ------------------------


@pytest.mark.parametrize("error, fix", [
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x/hf"), "check its permissions"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step-5"), "the disk is full"),
])
def test_os_error_is_one_line_naming_the_path(error, fix, capsys, monkeypatch):
    def fail(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "train", fail)
    code, err = run_cli(capsys, "train", "any.yaml")
    assert_one_error(code, err, 1, f"{error.filename}: {error.strerror}", fix)


def test_out_of_memory_is_one_line(capsys, monkeypatch):
    import torch

    def fail(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setitem(cli.COMMANDS, "train", fail)
    code, err = run_cli(capsys, "train", "any.yaml")
    assert_one_error(code, err, 1, "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB (", "data.max_tokens")


def test_a_bug_keeps_its_traceback(monkeypatch):
    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "train", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "any.yaml"])


# --- 1. Other subcommands' arguments ---------------------------------------------------------


def test_subcommand_path_arguments(tmp_path, capsys, tiny_model_dir):
    data = write_lines(tmp_path / "pairs.jsonl", [GOOD])
    cases = [
        (["score", "--model", tmp_path / "none", "--data", data, "--output", tmp_path / "o.jsonl"], tmp_path / "none", "(--model)"),
        (["eval", "--model", data, "--data", data, "--output-dir", tmp_path / "o"], data, "is a file, not a model folder"),
        (["eval", "--model", tiny_model_dir, "--data", tmp_path / "no.jsonl", "--output-dir", tmp_path / "o"], tmp_path / "no.jsonl", "(--data)"),
        (["convert", tmp_path / "no-ckpt", tmp_path / "hf"], tmp_path / "no-ckpt", "checkpoint not found"),
    ]
    for argv, where, what in cases:
        code, err = run_cli(capsys, *argv)
        assert_one_error(code, err, 2, f"{where}: ", what)


@pytest.mark.parametrize("device", ["gpu0", "cuda:7"])
def test_bad_device(device, tmp_path, capsys, tiny_model_dir):
    pytest.importorskip("polar_train.scoring")
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    data = write_lines(tmp_path / "pairs.jsonl", [GOOD])
    code, err = run_cli(capsys, "score", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "o.jsonl", "--device", device)
    assert_one_error(code, err, 2, "--device: ", device)


# --- a base folder damaged the way an interrupted download leaves it -------------------------


def _truncate_a_shard(model: Path) -> tuple[Path, str]:
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])  # the header is whole, the data is not
    return shard, "bytes where its header describes"


def _remove_a_shard(model: Path) -> tuple[Path, str]:
    sorted(model.glob("model-*.safetensors"))[-1].unlink()
    return model / "model.safetensors.index.json", "lists shard(s) that do not exist"


def _cut_json(name: str, what: str):
    def damage(model: Path) -> tuple[Path, str]:
        (model / name).write_text((model / name).read_text()[:30])
        return model / name, what
    return damage


def _remove_the_tokenizer(model: Path) -> tuple[Path, str]:
    for f in [*model.glob("tokenizer*"), model / "special_tokens_map.json"]:
        f.unlink(missing_ok=True)
    return model, "no tokenizer in this folder"


DAMAGE = {
    "truncated shard": _truncate_a_shard,
    "missing shard": _remove_a_shard,
    "cut config.json": _cut_json("config.json", "is not valid JSON"),
    "cut weight index": _cut_json("model.safetensors.index.json", "is not a valid weight index"),
    "no tokenizer files": _remove_the_tokenizer,
}


@pytest.fixture(scope="module")
def two_shard_model_dir(tmp_path_factory, tiny_model_dir: Path) -> Path:
    from polar_train.model import load_model

    return save_model(load_model(tiny_model_dir), tmp_path_factory.mktemp("models") / "two_shards",
                      base_dir=tiny_model_dir, max_shard_size="12KB")


@pytest.mark.parametrize("command", ["train", "data", "score", "eval"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_base_folder_is_one_line_naming_the_file(damage, command, tmp_path, capsys, repo_root, two_shard_model_dir):
    assert len(list(two_shard_model_dir.glob("model-*.safetensors"))) == 2
    model = copy_dir(two_shard_model_dir, tmp_path / "model")
    where, what = DAMAGE[damage](model)
    data = write_lines(tmp_path / "pairs.jsonl", [GOOD])
    if command in ("train", "data"):
        argv = [command, repo_root / "configs/demo.yaml", f"model.path={model}", f"data.train_files={data}",
                "data.eval_files=[]", f"output_dir={tmp_path / 'run'}", "data.cache_dir="]
    else:
        argv = [command, "--model", model, "--data", data, "--device", "cpu",
                *(["--output", tmp_path / "out.jsonl"] if command == "score" else ["--output-dir", tmp_path / "eval"])]
    code, err = run_cli(capsys, *argv)
    message = assert_one_error(code, err, 2, f"polar-train: error: {where}: ", what)
    assert "(" in message.splitlines()[0] and message.rstrip().endswith(")")  # the fix, in parentheses
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "out.jsonl").exists()  # before any work


def test_tokenizer_code_in_a_model_folder_runs_only_when_allowed(tmp_path, capsys, monkeypatch, repo_root, tiny_model_dir):
    """A folder whose tokenizer is code (not InternLM2's, built without it): `data` and `score` name the file and the opt-in,
    and the code does not run; --trust-remote-code reaches load_tokenizer (tests/test_data.py runs it)."""
    model = copy_dir(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer",
                  auto_map={"AutoTokenizer": [None, "tokenization_custom_fast.CustomTokenizerFast"]})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    code_file = model / "tokenization_custom_fast.py"
    code_file.write_text(f"from pathlib import Path\nfrom transformers import PreTrainedTokenizerFast\n\n"
                         f"Path({str(tmp_path / 'ran')!r}).touch()\n\n\n"
                         "class CustomTokenizerFast(PreTrainedTokenizerFast):\n    pass\n")
    # plain loading cannot read the tokenizer: no tokenizer.json, a tokenizer.model only the code reads
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.model").write_bytes(b"read by tokenization_custom_fast.py only")
    data = write_lines(tmp_path / "pairs.jsonl", [GOOD])
    train_args = [f"model.path={model}", f"data.train_files={data}", "data.eval_files=[]", "data.cache_dir="]
    code, err = run_cli(capsys, "data", repo_root / "configs/demo.yaml", *train_args)
    assert_one_error(code, err, 2, f"{code_file}: the tokenizer is Python code", "allow it with model.trust_remote_code=true")
    score = ["score", "--model", model, "--data", data, "--output", tmp_path / "out.jsonl", "--device", "cpu"]
    code, err = run_cli(capsys, *score)
    assert_one_error(code, err, 2, f"{code_file}: the tokenizer is Python code", "allow it with --trust-remote-code")
    assert not (tmp_path / "ran").exists()
    seen = {}

    def record(path, **options):
        seen.update(options)
        raise UserError(path, "recorded", "test")

    monkeypatch.setattr(scoring, "load_tokenizer", record)
    assert run_cli(capsys, *score, "--trust-remote-code")[0] == 2
    assert seen == {"trust_remote_code": True, "opt_in": "--trust-remote-code"}
    code, err = run_cli(capsys, "data", repo_root / "configs/demo.yaml", *train_args, "model.trust_remote_code=true")
    assert (tmp_path / "ran").exists()  # allowed: the folder's code ran (and failed on this stand-in tokenizer.model)
    assert_one_error(code, err, 2, f"{model}: could not load the tokenizer", "with its remote code")
