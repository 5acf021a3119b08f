"""The real InternLM2 tokenizer (``../shared/fixtures/internlm2-real-tokenizer``): built from its
``tokenizer.model`` without running the folder's code, it reproduces every ``expected.json`` id
list through the train data path (the store build) and through ``polar-train score``."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from polar_train import scoring
from polar_train.cli import main
from polar_train.errors import UserError
from polar_train.model import InternLM2RewardModel, ModelConfig, VarlenMeta
from polar_train.store_build import load_pair_store
from polar_train.tokenizer import load_tokenizer, special_token_ids

SEP_ID, REWARD_ID, VOCAB = 92397, 92527, 92544


@pytest.fixture(scope="session")
def real_dir(repo_root: Path) -> Path:
    return repo_root.parent / "shared" / "fixtures" / "internlm2-real-tokenizer"


@pytest.fixture(scope="session")
def cases(real_dir: Path) -> list[dict]:
    return json.loads((real_dir / "expected.json").read_text())["cases"]


@pytest.fixture(scope="session")
def real_tokenizer(real_dir: Path):
    return load_tokenizer(real_dir)


def test_built_from_tokenizer_model_without_running_the_folders_code(real_dir, real_tokenizer, cases):
    before = set(sys.modules)
    for allowed in (False, True):  # trust_remote_code changes nothing for InternLM2's tokenizer
        tok = load_tokenizer(real_dir, trust_remote_code=allowed)
        assert type(tok).__module__.startswith("transformers.")
        assert [tok.encode(c["text"]) for c in cases] == [c["input_ids"] for c in cases]
    assert not [name for name in set(sys.modules) - before if "internlm2" in name]  # no module from the folder
    assert len(real_tokenizer) == VOCAB
    assert special_token_ids(real_tokenizer, REWARD_ID) == (SEP_ID, REWARD_ID)
    assert real_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert real_tokenizer.decode(cases[0]["input_ids"][:-1], skip_special_tokens=True) == (
        "Name a primary colour.\nRed.Name a primary colour.\nBlue.")


def test_train_data_path_reproduces_expected_ids(tmp_path, real_dir, real_tokenizer, cases):
    """Each fixture row as a pair row (its output chosen): the store holds the expected ids."""
    rows = [{**c["row"], "chosen": c["row"]["output"], "rejected": "No."} for c in cases]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "output"}) + "\n" for r in rows))
    for num_proc in (1, 2):
        store, stats = load_pair_store([str(data)], real_tokenizer, str(real_dir), num_proc=num_proc,
                                       cache_dir=str(tmp_path / f"c{num_proc}"), reward_token_id=REWARD_ID)
        assert stats.num_pairs == len(cases)
        assert [chosen for chosen, _ in store.read_pairs(range(len(cases)))] == [c["input_ids"] for c in cases]


def test_score_reproduces_expected_ids_and_their_rewards(tmp_path, real_dir, cases, monkeypatch, capsys):
    """`polar-train score` on a checkpoint with the real tokenizer (a tiny fresh model, vocab 92544):
    it feeds the model the expected ids, and each reward is that id list's reward scored alone."""
    config = ModelConfig.fresh(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=32, vocab_size=VOCAB, reward_token_id=REWARD_ID)
    model = InternLM2RewardModel(config)
    model.init_weights(0)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.raw))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_internlm2.py",
                 "tokenization_internlm2_fast.py"):
        shutil.copy(real_dir / name, folder / name)
    seen: list[list[int]] = []
    encode = scoring.encode_candidates

    def record(*args, **kwargs):
        encoded = encode(*args, **kwargs)
        seen.extend(encoded.input_ids)
        return encoded

    monkeypatch.setattr(scoring, "encode_candidates", record)
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(folder), "--data", str(real_dir / "rows.jsonl"), "--output", str(out),
                 "--device", "cpu"]) == 0
    assert "Warning" not in capsys.readouterr().err  # transformers' rope_scaling FutureWarning among others
    assert seen == [c["input_ids"] for c in cases]
    rewards = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    with torch.no_grad():
        alone = [model(torch.tensor(c["input_ids"]), torch.arange(len(c["input_ids"])),
                       VarlenMeta.from_lengths([len(c["input_ids"])]), torch.tensor([len(c["input_ids"]) - 1])).item()
                 for c in cases]
    assert rewards == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("module, package", [("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")])
def test_a_missing_package_is_named_with_its_pip_command(real_dir, monkeypatch, module, package):
    import sentencepiece

    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    monkeypatch.delitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without it raises on import
    with pytest.raises(UserError) as info:
        load_tokenizer(real_dir)
    assert str(info.value) == (
        f"{real_dir / 'tokenizer.model'}: reading this sentencepiece model needs the Python package '{package}', which "
        f"is not installed (import of {module} halted; None in sys.modules) (install it: pip install {package})")


def test_remote_code_needing_a_missing_package_names_it(tmp_path, monkeypatch, tiny_tokenizer_path):
    """A non-InternLM2 folder whose tokenizer code imports a package that is not installed."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = shutil.copytree(tiny_tokenizer_path, tmp_path / "custom")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer",
                  auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_custom.py").write_text("import polar_missing_pkg\n")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"for the code")
    with pytest.raises(UserError) as info:
        load_tokenizer(folder, trust_remote_code=True)
    message = str(info.value)
    assert message.startswith(f"{folder}: loading this tokenizer needs the Python package 'polar_missing_pkg', "
                              "which is not installed (")
    assert message.endswith("(install it: pip install polar_missing_pkg)")


# --- batched tokenization (the store build) == one text at a time --------------------------------

EDGE_TEXTS = [
    "", " ", "  ", "\n", "\n\n\t ", "a  b   c", " leading", "trailing ", "<s>", "</s>", "<unk>", "a<s>b</s>c",
    "[UNUSED_TOKEN_130]", "x[UNUSED_TOKEN_130]", "<|reward|><|reward|>", "a<|reward|>b",
    "[UNUSED_TOKEN_5] [UNUSED_TOKEN_146]", "emoji 😀🤖 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u200b\u00a0\ufeff zero-width", "é vs e\u0301",
    "中文，标点。「引号」", "مرحبا", "\x00\x01\x7f",
    "▁ literal metaspace", "What is the capital of China?\nBeijing.",
]


@pytest.fixture(scope="session", params=["real", "demo", "tiny"])
def any_tokenizer(request, real_tokenizer, demo_tokenizer, tiny_tokenizer):
    return {"real": real_tokenizer, "demo": demo_tokenizer, "tiny": tiny_tokenizer}[request.param]


def test_encode_texts_equals_encode_one_by_one(any_tokenizer, cases):
    from polar_train.tokenizer import encode_texts

    texts = EDGE_TEXTS + [c["text"] for c in cases] + ["".join(EDGE_TEXTS) * 3]
    one_by_one = [any_tokenizer.encode(t, add_special_tokens=True) for t in texts]
    assert encode_texts(any_tokenizer, texts) == one_by_one
    assert encode_texts(any_tokenizer, []) == []
    any_tokenizer(["a", "b c"], truncation=True, max_length=2)  # a call that leaves truncation set on the backend
    assert encode_texts(any_tokenizer, texts) == one_by_one


def test_batched_rows_equal_encode_candidates_text_by_text(any_tokenizer, cases):
    """encode_preferences (the store build: two batch calls for all rows) against data.encode_candidates
    (tokenizer.encode text by text), on pairs from the fixture rows and the edge texts, with limits that
    truncate prompts and responses and drop some rows; and ranked lists against their rows one by one."""
    from polar_train.data import encode_candidates
    from polar_train.ranked import encode_preference, encode_preferences, parse_preference

    sep_id, reward_id = special_token_ids(any_tokenizer, None)
    texts = EDGE_TEXTS + [c["text"] for c in cases]
    rows = [{"prompt": texts[k], "reference": texts[(k + 3) % len(texts)], "chosen": texts[(k + 7) % len(texts)],
             "rejected": texts[(k + 11) % len(texts)], **({"wrapper": "pretrain"} if k % 5 == 0 else {})}
            for k in range(len(texts))]
    lists = [{"prompt": texts[k], "ranked": [texts[(k + j) % len(texts)] for j in range(1, 5)]}
             for k in range(len(texts))]
    for max_length, max_response in ((16384, 4096), (96, 24), (16, 8)):
        limits = dict(max_length=max_length, max_response_length=max_response, sep_id=sep_id, reward_id=reward_id)
        prefs = [parse_preference(r) for r in rows]
        batched = encode_preferences(any_tokenizer, prefs, **limits)
        one_by_one = [encode_candidates(any_tokenizer, p.prompt, p.reference, p.candidates, p.wrapper, **limits)
                      for p in prefs]
        assert [e and e.seqs for e in batched] == [e and e.input_ids for e in one_by_one]
        assert any(e is None for e in batched) == (max_length == 16)
        if max_length == 96:  # both kinds of truncation happen
            assert any(e.prompt_truncated for e in batched if e) and any(e.response_truncated for e in batched if e)
        list_prefs = [parse_preference(r) for r in lists]
        assert encode_preferences(any_tokenizer, list_prefs, **limits) == [encode_preference(any_tokenizer, p, **limits)
                                                                            for p in list_prefs]


def test_only_the_rope_scaling_future_warning_is_silenced_while_a_tokenizer_loads():
    """A folder's configuration_internlm2.py assigns ``config.rope_scaling``, which transformers 5
    answers with a FutureWarning; it is ignored while the tokenizer loads, nothing else is."""
    import warnings

    from transformers import PretrainedConfig

    from polar_train.tokenizer import _quiet_transformers

    def caught(inside: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with _quiet_transformers() if inside else contextlib.nullcontext():
                PretrainedConfig().rope_scaling = {"type": "dynamic", "factor": 2.0}
                warnings.warn("another deprecation", FutureWarning)
        return [str(w.message).split(" ")[0] for w in seen]

    import transformers

    outside = caught(False)
    major = int(transformers.__version__.split(".")[0])
    assert outside == (["`rope_scaling`", "another"] if major >= 5 else ["another"])
    assert caught(True) == ["another"]


def test_a_folder_that_cannot_be_built_is_one_line(tmp_path, real_dir):
    folder = shutil.copytree(real_dir, tmp_path / "copy")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["92544"] = {"content": "<|extra|>", "special": True}  # one past the model's pieces
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.encode("a<|extra|>", add_special_tokens=False)[-1] == 92544 and len(tok) == VOCAB + 1
    config["added_tokens_decoder"]["92546"] = {"content": "<|gap|>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as info:
        load_tokenizer(folder)
    assert str(info.value) == (f"{folder / 'tokenizer_config.json'}: added token '<|gap|>' should have id 92546 "
                               "but gets 92545 (number added_tokens_decoder's ids past the sentencepiece model "
                               "one after the other)")
    (folder / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"tokenizer.model: not a readable sentencepiece model \(.*\) \(copy "
                                        r"tokenizer.model again from the base checkpoint\)$"):
        load_tokenizer(folder)
