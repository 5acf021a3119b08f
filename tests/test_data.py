"""Data: JSONL validation (SPEC 2), the exact POLAR sequence (SPEC 3), tokenizers, the tokenization cache.

Encodings are checked two ways: against texts written out by hand (with a merge-free byte-level
tokenizer, where a field of n ASCII characters is exactly 1 + n ids, so budgets can be worked
out on paper), and against ``spec_encode`` below, a separate transcription of SPEC 3 that does
not use polar_train.data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from polar_train.data import (
    EncodedCandidates,
    PairRecord,
    SkippedRow,
    encode_candidates,
    encode_pair,
    read_jsonl_pairs,
    read_jsonl_rows,
)
from polar_train.errors import UserError
from polar_train.store import SCHEMA
from polar_train.store_build import load_pair_store
from polar_train.tokenizer import (
    REWARD_TOKEN,
    SEP_TOKEN,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
)

SEP_ID, REWARD_ID = 3, 4  # build_tokenizer's ids for <|reward|> and [UNUSED_TOKEN_130]


# --- helpers ---------------------------------------------------------------------------------


def spec_encode(tok: PreTrainedTokenizerBase, p: str, ref: str, outs: list[str], wrapper: str,
                max_length: int = 16384, max_response_length: int = 4096) -> list[list[int]] | None:
    """SPEC 3, transcribed step by step (independent of polar_train.data)."""
    # 2. tokenize each field alone, with BOS
    p_ids = tok(p, add_special_tokens=True)["input_ids"]
    ref_ids = tok(ref, add_special_tokens=True)["input_ids"]
    out_ids = [tok(o, add_special_tokens=True)["input_ids"] for o in outs]
    # 3. reference and candidates keep their first max_response_length tokens
    ref_ids = ref_ids[:max_response_length]
    out_ids = [o[:max_response_length] for o in out_ids]
    # 4. prompt budget; P <= 0 means the pair does not fit
    L = max_length - 4
    P = min((L - len(ref_ids) - len(o)) // 2 for o in out_ids)
    if P <= 0:
        return None
    if len(p_ids) > P:
        p_ids = p_ids[-P:]
    # 5. decode everything
    p_txt = tok.decode(p_ids, skip_special_tokens=True)
    ref_txt = tok.decode(ref_ids, skip_special_tokens=True)
    result = []
    for o in out_ids:
        out_txt = tok.decode(o, skip_special_tokens=True)
        # 6. join
        ref_cat = p_txt + ref_txt if wrapper == "pretrain" or ref_txt == "" else p_txt + "\n" + ref_txt
        out_cat = p_txt + out_txt if wrapper == "pretrain" or out_txt == "" else p_txt + "\n" + out_txt
        # 7. the sequence
        result.append(tok(ref_cat + "<|reward|>" + out_cat, add_special_tokens=True)["input_ids"] + [REWARD_ID])
    return result


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerBase:
    """No merges (vocabulary = 5 specials + 256 bytes): one id per byte, plus BOS."""
    return build_tokenizer(["unused"], vocab_size=261)


def byte_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """BOS + one id per byte of ``text`` for ``byte_tokenizer`` (specials written as their ids)."""
    # GPT-2's byte -> symbol map: printable bytes stand for themselves, the others are 256 + n in order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    ids = [1]
    for piece in text.split(SEP_TOKEN):
        ids += [tok.convert_tokens_to_ids(table[b]) for b in piece.encode("utf-8")] + [SEP_ID]
    return ids[:-1]


def encode(tok: PreTrainedTokenizerBase, p: str, ref: str, outs: list[str], wrapper: str = "sft",
           **lengths: int) -> EncodedCandidates | None:
    return encode_candidates(tok, p, ref, outs, wrapper, sep_id=SEP_ID, reward_id=REWARD_ID, **lengths)


def write(path: Path, lines: list[Any]) -> Path:
    """Write rows (dicts are JSON-encoded, strings written as they are) one per line."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


ROW = {"prompt": "What is 7 + 5?", "reference": "12", "chosen": "The answer is 12.", "rejected": "It is 13."}


# --- tokenizers ------------------------------------------------------------------------------


def test_build_tokenizer_layout_and_exact_round_trip(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = tiny_tokenizer
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<unk>", "<s>", "</s>", SEP_TOKEN, REWARD_TOKEN]
    for text in ["What is 7 + 5?", "  two  spaces\n\nand\ttabs ", "北京 émoji 🎉", "", "a <|reward|> b"]:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids[0] == 1 and 2 not in ids  # BOS, no EOS
        expected = text.replace(SEP_TOKEN, "")
        assert tok.decode(ids, skip_special_tokens=True) == expected
    assert special_token_ids(tok, 4) == (SEP_ID, REWARD_ID)


def test_byte_tokenizer_helper_is_one_id_per_byte(byte_tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Q: é?\n ok"
    assert byte_tokenizer.encode(text) == byte_ids(byte_tokenizer, text)
    assert len(byte_tokenizer.encode(text)) == 1 + len(text.encode())


def test_special_token_lookup_errors(tmp_path: Path) -> None:
    no_reward = build_tokenizer(["abc"], vocab_size=270, extra_special_tokens=(SEP_TOKEN,))
    with pytest.raises(UserError, match=r"no token '\[UNUSED_TOKEN_130\]'.*add_special_tokens"):
        special_token_ids(no_reward, None)
    no_sep = build_tokenizer(["abc"], vocab_size=270, extra_special_tokens=(REWARD_TOKEN,))
    save_tokenizer(no_sep, tmp_path / "no_sep")
    with pytest.raises(UserError) as error:
        special_token_ids(load_tokenizer(tmp_path / "no_sep"), None)
    assert str(tmp_path / "no_sep") in str(error.value) and "'<|reward|>'" in str(error.value)
    both = build_tokenizer(["abc"], vocab_size=270)
    with pytest.raises(UserError, match="maps '.UNUSED_TOKEN_130.' to id 4 but the model config has reward_token_id 92527"):
        special_token_ids(both, 92527)


def test_load_tokenizer_errors(tmp_path: Path, fixture_dir: Path) -> None:
    with pytest.raises(UserError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"no tokenizer in this folder \(found: config.json\)"):
        load_tokenizer(tmp_path / "weights_only")
    if fixture_dir.is_dir():  # a checkpoint without tokenizer files
        with pytest.raises(UserError, match="no tokenizer in this folder"):
            load_tokenizer(fixture_dir)


def test_the_folders_tokenizer_code_runs_only_when_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder whose tokenizer is declared as remote code (not InternLM2's, which is built without it:
    tests/test_tokenizer_real.py); plain loading refuses it. Without
    the opt-in, one line names the file and the setting, and the code does not run."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "polar_like"
    save_tokenizer(build_tokenizer(["What is 7 + 5?"], vocab_size=270), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer",
                  auto_map={"AutoTokenizer": [None, "tokenization_custom_fast.CustomTokenizerFast"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_custom_fast.py").write_text(
        f"from pathlib import Path\nfrom transformers import PreTrainedTokenizerFast\n\nPath({str(tmp_path / 'ran')!r}).touch()\n\n"
        "class CustomTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
    )
    for opt_in in ("model.trust_remote_code=true", "--trust-remote-code"):
        with pytest.raises(UserError, match=f"runs this file \\(if you trust this folder, allow it with {opt_in}\\)") as info:
            load_tokenizer(folder, opt_in=opt_in)
        assert info.value.where == str(folder / "tokenization_custom_fast.py")
    assert not (tmp_path / "ran").exists()
    tok = load_tokenizer(folder, trust_remote_code=True)
    assert (tmp_path / "ran").exists()
    assert type(tok).__name__ == "CustomTokenizerFast"
    assert special_token_ids(tok, None) == (SEP_ID, REWARD_ID)


# --- SPEC 3 encoding -------------------------------------------------------------------------


def test_spec_example_text(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = tiny_tokenizer
    enc = encode(tok, "What is the capital of China?", "Beijing.", ["Beijing.", "Shanghai."])
    assert enc is not None and not enc.prompt_truncated and not enc.response_truncated
    assert enc.texts[0] == "What is the capital of China?\nBeijing.<|reward|>What is the capital of China?\nBeijing."
    assert enc.texts[1] == "What is the capital of China?\nBeijing.<|reward|>What is the capital of China?\nShanghai."
    # POLAR's client sends text + "[UNUSED_TOKEN_130]": the same ids
    assert enc.input_ids[0] == tok.encode(enc.texts[0] + REWARD_TOKEN, add_special_tokens=True)
    assert tok.decode(enc.input_ids[0]) == "<s>" + enc.texts[0] + REWARD_TOKEN
    assert enc.input_ids == spec_encode(tok, "What is the capital of China?", "Beijing.", ["Beijing.", "Shanghai."], "sft")


def test_plain_strings_hand_written(byte_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = byte_tokenizer
    enc = encode(tok, "Hi?", "ok", ["ok", "no!"])
    assert enc is not None
    assert enc.input_ids[0] == byte_ids(tok, "Hi?\nok<|reward|>Hi?\nok") + [REWARD_ID]
    assert enc.input_ids[1] == byte_ids(tok, "Hi?\nok<|reward|>Hi?\nno!") + [REWARD_ID]
    single = encode(tok, "Hi?", "ok", ["no!"])  # scoring one output: the same sequence
    assert single is not None and single.input_ids == [enc.input_ids[1]]


def test_message_lists_are_flattened(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    row = {
        "prompt": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 7 + 5?"}],
        "reference": [{"role": "assistant", "content": "12"}],
        "chosen": [{"role": "assistant", "content": "The answer"}, {"role": "assistant", "content": "is 12."}],
        "rejected": "It is 13.",
    }
    (record,), skipped = read_jsonl_pairs(write(tmp_path / "m.jsonl", [row]))
    assert skipped == []
    assert record == PairRecord("You are a helpful assistant.\nWhat is 7 + 5?", "12", "The answer\nis 12.", "It is 13.", "sft", f"{tmp_path / 'm.jsonl'}:1")
    ids = encode_pair(tiny_tokenizer, record, sep_id=SEP_ID, reward_id=REWARD_ID)
    assert ids is not None and list(ids) == spec_encode(tiny_tokenizer, record.prompt, "12", [record.chosen, record.rejected], "sft")
    enc = encode(tiny_tokenizer, record.prompt, "12", [record.chosen])
    assert enc is not None
    assert enc.texts[0] == "You are a helpful assistant.\nWhat is 7 + 5?\n12<|reward|>You are a helpful assistant.\nWhat is 7 + 5?\nThe answer\nis 12."


def test_empty_reference(byte_tokenizer: PreTrainedTokenizerBase, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    enc = encode(byte_tokenizer, "Hi?", "", ["ok"])
    assert enc is not None and enc.texts == ["Hi?<|reward|>Hi?\nok"]
    assert enc.input_ids[0] == byte_ids(byte_tokenizer, "Hi?<|reward|>Hi?\nok") + [REWARD_ID]
    enc = encode(tiny_tokenizer, "What is 7 + 5?", "", ["12", "13"])
    assert enc is not None and enc.input_ids == spec_encode(tiny_tokenizer, "What is 7 + 5?", "", ["12", "13"], "sft")


def test_pretrain_wrapper(byte_tokenizer: PreTrainedTokenizerBase, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    enc = encode(byte_tokenizer, "Q: Hi?\nA: ", "ok", ["ok", "no"], "pretrain")
    assert enc is not None and enc.texts == ["Q: Hi?\nA: ok<|reward|>Q: Hi?\nA: ok", "Q: Hi?\nA: ok<|reward|>Q: Hi?\nA: no"]
    assert enc.input_ids[1] == byte_ids(byte_tokenizer, enc.texts[1]) + [REWARD_ID]
    args = ("Q: What is 7 + 5?\nA:", " 12", [" 12", " 13"], "pretrain")
    enc = encode(tiny_tokenizer, *args)
    assert enc is not None and enc.input_ids == spec_encode(tiny_tokenizer, *args)


def test_prompt_truncation_keeps_the_last_tokens(byte_tokenizer: PreTrainedTokenizerBase, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    # max_length 30: L = 26; ref "ok" = 3 ids, outputs "yes" = 4 and "no" = 3 ids;
    # P = min((26-3-4)//2, (26-3-3)//2) = min(9, 10) = 9: the prompt's last 9 ids, i.e. its last 9 characters
    enc = encode(byte_tokenizer, "0123456789ABCDEF", "ok", ["yes", "no"], max_length=30)
    assert enc is not None and enc.prompt_truncated and not enc.response_truncated
    assert enc.texts == ["789ABCDEF\nok<|reward|>789ABCDEF\nyes", "789ABCDEF\nok<|reward|>789ABCDEF\nno"]
    assert enc.input_ids[0] == byte_ids(byte_tokenizer, enc.texts[0]) + [REWARD_ID]
    # exactly at the budget: untouched (9 characters = 10 ids > 9, 8 characters = 9 ids fit)
    enc = encode(byte_tokenizer, "12345678", "ok", ["yes", "no"], max_length=30)
    assert enc is not None and not enc.prompt_truncated and enc.texts[0].startswith("12345678\n")
    prompt = "Please answer this question carefully. " * 5 + "What is 7 + 5?"
    for max_length in (24, 31, 40, 64):
        enc = encode(tiny_tokenizer, prompt, "12", ["12", "The answer is 13."], max_length=max_length)
        assert enc is not None and enc.prompt_truncated
        assert enc.input_ids == spec_encode(tiny_tokenizer, prompt, "12", ["12", "The answer is 13."], "sft", max_length)
        assert enc.texts[0].split("\n")[0] in prompt and prompt.endswith(enc.texts[0].split("\n")[0])


def test_response_truncation(byte_tokenizer: PreTrainedTokenizerBase, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    # max_response_length 4: BOS + 3 characters survive
    enc = encode(byte_tokenizer, "Hi?", "abcdefgh", ["123456", "xy"], max_response_length=4)
    assert enc is not None and enc.response_truncated and not enc.prompt_truncated
    assert enc.texts == ["Hi?\nabc<|reward|>Hi?\n123", "Hi?\nabc<|reward|>Hi?\nxy"]
    assert enc.input_ids[0] == byte_ids(byte_tokenizer, enc.texts[0]) + [REWARD_ID]
    only_output = encode(byte_tokenizer, "Hi?", "abc", ["xy", "12345"], max_response_length=4)
    assert only_output is not None and only_output.response_truncated
    not_cut = encode(byte_tokenizer, "Hi?", "abc", ["xyz"], max_response_length=4)
    assert not_cut is not None and not not_cut.response_truncated
    args = ("What is 7 + 5?", "The answer is 12. " * 6, ["The answer is 12. " * 5, "It is 13."], "sft")
    enc = encode(tiny_tokenizer, *args, max_response_length=7)
    assert enc is not None and enc.response_truncated
    assert enc.input_ids == spec_encode(tiny_tokenizer, *args, max_response_length=7)


def test_pair_that_cannot_fit(byte_tokenizer: PreTrainedTokenizerBase, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    # max_length 14: L = 10; ref "ok" 3 ids, "yes" 4 ids: P = (10-3-4)//2 = 1 fits; "yes!" 5 ids: P = 1; "yes!!" 6: P = 0
    assert encode(byte_tokenizer, "Hi?", "ok", ["yes"], max_length=14) is not None
    assert encode(byte_tokenizer, "Hi?", "ok", ["no", "yes!!"], max_length=14) is None
    assert spec_encode(byte_tokenizer, "Hi?", "ok", ["no", "yes!!"], "sft", 14) is None
    path = write(tmp_path / "long.jsonl", [ROW, dict(ROW, chosen="The answer is 12. " * 20), ROW])
    store, stats = load_pair_store([str(path)], tiny_tokenizer, "tiny", max_length=40, max_response_length=4096)
    assert stats.num_rows == 3 and stats.num_pairs == 2 and len(store) == 2
    assert stats.num_too_long == 1 and stats.too_long_sources == [f"{path}:2"]
    assert store.column("source") == [f"{path}:1", f"{path}:3"]


# --- SPEC 2 validation -----------------------------------------------------------------------

BAD_ROWS = [
    # (line 2 content, message fragment)
    ('{"prompt": "a", "reference": "b", "chosen": "c", "rejected": "d"', "invalid JSON"),
    ('["prompt", "reference"]', "the line is a JSON list; expected an object"),
    (json.dumps({k: v for k, v in ROW.items() if k != "rejected"}), "field 'rejected' is missing"),
    (json.dumps(dict(ROW, chosen=12)), "field 'chosen' is of type integer; expected a string or a list of messages"),
    (json.dumps(dict(ROW, reference=None)), "field 'reference' is of type null"),
    (json.dumps(dict(ROW, prompt={"content": "x"})), "field 'prompt' is of type object"),
    (json.dumps(dict(ROW, prompt=[{"role": "user"}])), "field 'prompt': message 1 has no 'content'"),
    (json.dumps(dict(ROW, prompt=[{"role": "user", "content": "x"}, "y"])), "message 2 is of type string"),
    (json.dumps(dict(ROW, chosen=[{"role": "assistant", "content": ["x"]}])), "message 1 has 'content' of type list; expected a string"),
    (json.dumps(dict(ROW, wrapper="chat")), "field 'wrapper' is 'chat'; expected one of sft, pretrain"),
    (json.dumps(dict(ROW, wrapper=1)), "field 'wrapper' is of type integer"),
]


@pytest.mark.parametrize("line, message", BAD_ROWS, ids=[m.split(";")[0][:40] for _, m in BAD_ROWS])
def test_each_validation_error_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + line + "\n" + json.dumps(ROW) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        read_jsonl_pairs(path)
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)


def test_undecodable_bytes_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    good = json.dumps(ROW).encode()
    path.write_bytes(good + b"\n\n   \n" + b'{"prompt": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(UserError, match=rf"^{path}:4: the line is not valid UTF-8 \(byte 0xe9"):
        read_jsonl_pairs(path)
    records, skipped = read_jsonl_pairs(path, on_error="skip")
    assert [r.source for r in records] == [f"{path}:1", f"{path}:5"]
    assert skipped == [SkippedRow(f"{path}:4", skipped[0].reason)] and "UTF-8" in skipped[0].reason


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    for content in ("", "\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(UserError, match=rf"^{path}: no rows"):
            read_jsonl_pairs(path)
    with pytest.raises(UserError, match="data file not found"):
        read_jsonl_pairs(tmp_path / "nope.jsonl")


def test_on_error_skip_collects_bad_rows(tmp_path: Path) -> None:
    lines = [json.dumps(ROW)] + [line for line, _ in BAD_ROWS] + [json.dumps(dict(ROW, reference="", wrapper="pretrain"))]
    path = write(tmp_path / "mixed.jsonl", lines)
    records, skipped = read_jsonl_pairs(path, on_error="skip")
    assert [r.source for r in records] == [f"{path}:1", f"{path}:{len(lines)}"]
    assert records[1].reference == "" and records[1].wrapper == "pretrain"
    assert [s.source for s in skipped] == [f"{path}:{n}" for n in range(2, len(lines))]
    assert all(message in s.reason for s, (_, message) in zip(skipped, BAD_ROWS))
    all_bad = write(tmp_path / "all_bad.jsonl", ["[1]", "2"])
    with pytest.raises(UserError, match=r"no valid rows \(2 bad rows skipped"):
        read_jsonl_pairs(all_bad, on_error="skip")


def test_generic_rows_keep_other_fields(tmp_path: Path) -> None:
    row = {"id": 7, "prompt": "Hi?", "reference": "ok", "output": [{"role": "assistant", "content": "ok"}], "meta": {"a": 1}}
    (got,), _ = read_jsonl_rows(write(tmp_path / "score.jsonl", [row]), ["prompt", "reference", "output"])
    assert got.texts == {"prompt": "Hi?", "reference": "ok", "output": "ok"} and got.wrapper == "sft"
    assert got.raw == row and got.source == f"{tmp_path / 'score.jsonl'}:1"


# --- the dataset and its cache ---------------------------------------------------------------


def test_load_pair_store_columns_and_stats(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    a = write(tmp_path / "a.jsonl", [ROW, dict(ROW, prompt=[{"role": "user", "content": "What is 7 + 5?"}])])
    b = write(tmp_path / "b.jsonl", ["{oops", dict(ROW, reference="12 " * 30)])
    store, stats = load_pair_store([str(a), str(b)], tiny_tokenizer, "tiny", max_length=4096,
                                   max_response_length=16, on_error="skip")
    assert store.table.column_names == ["seqs", "better", "worse", "order", "source", "total_len", "longest", "num_seqs",
                                        "prefix_len", "num_pairs"]
    assert store.column("source") == [f"{a}:1", f"{a}:2", f"{b}:2"]
    expected = spec_encode(tiny_tokenizer, ROW["prompt"], ROW["reference"], [ROW["chosen"], ROW["rejected"]], "sft")
    assert store.read_pairs([0]) == [tuple(expected)]
    assert store.read_pairs([1])[0][0] == expected[0]  # the message list flattens to the same prompt
    assert (stats.num_rows, stats.num_pairs, stats.num_skipped, stats.num_too_long) == (4, 3, 1, 0)
    assert stats.skipped[0].source == f"{b}:1" and stats.num_response_truncated == 1 and stats.num_prompt_truncated == 0
    assert stats.num_tokens == sum(len(x) for seqs in store.column("seqs") for x in seqs)
    assert "3 pairs" in stats.summary()


def test_cache_hit_does_not_tokenize_again(tmp_path: Path, tiny_tokenizer_path: Path, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    tok = load_tokenizer(tiny_tokenizer_path)
    path = write(tmp_path / "train.jsonl", [ROW, dict(ROW, wrapper="pretrain"), dict(ROW, chosen="x " * 50)])
    kwargs: dict[str, Any] = dict(max_length=48, max_response_length=4096, cache_dir=str(tmp_path / "cache"))
    first, first_stats = load_pair_store([str(path)], tok, str(tiny_tokenizer_path), **kwargs)
    assert not first_stats.cache_hit and first_stats.num_too_long == 1
    (entry,) = (tmp_path / "cache").iterdir()
    assert (entry / "stats.json").is_file() and len(entry.name) == 64  # sha256 key, no leftover temp folder

    def no_tokenizing(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the tokenizer was called on a cache hit")

    for name in ("encode", "decode", "__call__", "convert_ids_to_tokens"):
        monkeypatch.setattr(tok, name, no_tokenizing)
    monkeypatch.setattr("polar_train.store_build.special_token_ids", lambda *a: (SEP_ID, REWARD_ID))
    with caplog.at_level(logging.INFO, logger="polar_train"):
        second, second_stats = load_pair_store([str(path)], tok, str(tiny_tokenizer_path), **kwargs)
    assert second_stats.cache_hit and "cache hit" in caplog.text
    assert all(second.column(name) == first.column(name) for name in SCHEMA.names)
    assert (second_stats.num_pairs, second_stats.too_long_sources) == (first_stats.num_pairs, first_stats.too_long_sources)
    # anything that changes the ids changes the key: a different length, different file bytes
    with pytest.raises(AssertionError, match="tokenizer was called"):
        load_pair_store([str(path)], tok, str(tiny_tokenizer_path), **dict(kwargs, max_length=64))
    write(path, [ROW])
    with pytest.raises(AssertionError, match="tokenizer was called"):
        load_pair_store([str(path)], tok, str(tiny_tokenizer_path), **kwargs)


# --- the shipped demo data -------------------------------------------------------------------


def test_demo_data_is_valid_short_and_held_out(repo_root: Path, demo_tokenizer: PreTrainedTokenizerBase) -> None:
    sep_id, reward_id = special_token_ids(demo_tokenizer, None)
    questions = {}
    for split in ("train", "eval"):
        records, _ = read_jsonl_pairs(repo_root / "data" / f"demo_{split}.jsonl")
        questions[split] = {r.prompt.split("\n")[0].removeprefix("Q: ") if r.wrapper == "pretrain" else r.prompt.split("\n")[-1]
                            for r in records}
        assert all(r.reference and r.chosen != r.rejected for r in records)
        assert {r.wrapper for r in records} == {"sft", "pretrain"}
        lengths = [len(ids) for r in records for ids in encode_pair(demo_tokenizer, r, sep_id=sep_id, reward_id=reward_id)]
        assert max(lengths) <= 64 and sum(lengths) / len(lengths) < 40
        assert len(records) == {"train": 4000, "eval": 200}[split]
    assert not questions["train"] & questions["eval"]
