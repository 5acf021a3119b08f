"""``polar-train pretrain-pairs``: POLAR's policy-discriminative pairs from policy samples (SPEC 9).

What is checked: reference and chosen are two different samples of one policy and rejected is
from another (by sample index in ``plan_group``, by text in files whose texts are unique, and
with duplicate texts); ``--negatives`` gives distinct rejected policies, capped by what the
prompt has; same seed same bytes; every bad row is one ``FILE:LINE`` line with exit 2;
unpairable prompts are counted; message lists are flattened and grouped with equal strings;
memory stays far below the input on a large generated file; the trainer reads the output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from polar_train.cli import main
from polar_train.pretrain_pairs import build_pretrain_pairs, plan_group
from polar_train.store_build import load_pair_store

from test_errors import _quiet_logger, write_lines  # noqa: F401  (_quiet_logger: an autouse fixture)

GOOD = {"prompt": "What is 7 + 5?", "policy": "a", "output": "12"}
PAIR_KEYS = ["prompt", "reference", "chosen", "rejected", "wrapper", "reference_policy", "rejected_policy"]


# --- helpers ---------------------------------------------------------------------------------


def sample(prompt: str, policy: str, output: str, wrapper: str | None = None) -> dict:
    row = {"prompt": prompt, "policy": policy, "output": output}
    return row if wrapper is None else {**row, "wrapper": wrapper}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_pair_rules(rows: list[dict], samples: list[dict]) -> None:
    """Every row: reference and chosen two different samples of one policy (texts are unique in
    ``samples``), rejected a sample of another policy, all of the row's prompt and wrapper."""
    owner = {(s["prompt"], s.get("wrapper") or "sft", s["output"]): s["policy"] for s in samples}
    assert len(owner) == len(samples), "the samples' texts must be unique for this check"
    for row in rows:
        assert list(row) == PAIR_KEYS
        group = (row["prompt"], row["wrapper"])
        assert owner[(*group, row["reference"])] == row["reference_policy"]
        assert owner[(*group, row["chosen"])] == row["reference_policy"]
        assert owner[(*group, row["rejected"])] == row["rejected_policy"]
        assert row["reference"] != row["chosen"]
        assert row["rejected_policy"] != row["reference_policy"]


def random_samples(rng: random.Random, num_prompts: int) -> list[dict]:
    """Prompts with 1-5 policies of 1-4 samples each, both wrappers, shuffled; unique texts."""
    samples = []
    for p in range(num_prompts):
        for k in range(rng.randint(1, 5)):
            for j in range(rng.randint(1, 4)):
                samples.append(sample(f"prompt {p}", f"policy-{k}", f"answer {p}.{k}.{j}", rng.choice([None, "sft", "pretrain"])))
    rng.shuffle(samples)
    return samples


# --- 1. The pairing rule ----------------------------------------------------------------------


@pytest.mark.parametrize("negatives", [1, 2, 3, 7])
def test_plan_group_follows_the_documented_rule(negatives):
    rng = random.Random(negatives)
    for _ in range(300):
        policies = [rng.choice("abcde") for _ in range(rng.randint(1, 12))]
        triples = plan_group(policies, negatives, random.Random(rng.random()))
        count = Counter(policies)
        others = len(count) - 1
        repeated = [i for i, p in enumerate(policies) if count[p] >= 2 and others]
        by_pair = defaultdict(list)
        for reference, chosen, rejected in triples:
            assert reference != chosen  # sample identity, not text
            assert policies[reference] == policies[chosen] != policies[rejected]
            by_pair[reference, chosen].append(policies[rejected])
        # every sample of a policy with two or more samples: reference of one pair, chosen of one
        assert sorted(r for r, _ in by_pair) == repeated
        assert sorted(c for _, c in by_pair) == repeated
        for rejected_policies in by_pair.values():
            assert len(rejected_policies) == len(set(rejected_policies)) == min(negatives, others)
        assert len(triples) == len(repeated) * min(negatives, others)


def test_plan_group_spreads_rejected_samples_round_robin():
    # policy a: 4 pairs, each rejected from b, whose 2 samples serve twice each; b: 2 pairs, two a samples
    policies = ["a", "a", "b", "a", "b", "a"]
    triples = plan_group(policies, 1, random.Random(0))
    assert Counter(rejected for reference, _, rejected in triples if policies[reference] == "a") == {2: 2, 4: 2}
    assert len({rejected for reference, _, rejected in triples if policies[reference] == "b"}) == 2


def test_plan_group_with_two_samples_gives_both_orders():
    assert sorted(plan_group(["a", "b", "a"], 1, random.Random(3))) == [(0, 2, 1), (2, 0, 1)]


def test_unpairable_groups_give_nothing():
    assert plan_group(["a", "a", "a"], 1, random.Random(0)) == []  # one policy only
    assert plan_group(["a", "b", "c"], 1, random.Random(0)) == []  # no policy with two samples
    with pytest.raises(ValueError, match="negatives must be at least 1"):
        plan_group(["a", "a", "b"], 0, random.Random(0))


# --- 2. Files in, pair rows out ---------------------------------------------------------------


def test_rows_pair_same_policy_reference_and_chosen_with_another_policy_rejected(tmp_path):
    samples = random_samples(random.Random(0), 40)
    out = tmp_path / "pairs.jsonl"
    stats = build_pretrain_pairs([write_lines(tmp_path / "s.jsonl", samples)], out, negatives=2)
    rows = read_rows(out)
    assert_pair_rules(rows, samples)
    assert stats.num_samples == len(samples) and stats.num_rows == len(rows) > 0
    # the row count the documented rule gives, group by group
    groups = defaultdict(Counter)
    for s in samples:
        groups[s["prompt"], s.get("wrapper") or "sft"][s["policy"]] += 1
    expected = sum(n * min(2, len(c) - 1) for c in groups.values() for n in c.values() if n >= 2)
    assert len(rows) == expected
    assert stats.num_prompts == len(groups)
    assert stats.num_pairs == len({(r["prompt"], r["wrapper"], r["reference"], r["chosen"]) for r in rows})


def test_duplicate_texts_are_distinct_samples_and_one_sample_never_pairs_with_itself(tmp_path):
    lines = [sample("p", "a", "same"), sample("p", "b", "other"), sample("p", "a", "same"),  # two samples, one text
             sample("q", "a", "same"), sample("q", "b", "other")]  # one sample of each policy: no pair
    out = tmp_path / "pairs.jsonl"
    stats = build_pretrain_pairs([write_lines(tmp_path / "s.jsonl", lines)], out)
    rows = read_rows(out)
    assert [(r["prompt"], r["reference"], r["chosen"], r["rejected"]) for r in rows] == [("p", "same", "same", "other")] * 2
    assert (stats.num_pairs, stats.num_no_repeat, stats.no_repeat_sources) == (2, 1, [f"{tmp_path / 's.jsonl'}:4"])


@pytest.mark.parametrize("negatives", [1, 2, 3, 5])
def test_negatives_gives_distinct_rejected_policies_capped_by_the_prompt(tmp_path, negatives):
    # policies a (3 samples), b (1), c (2), d (1): 5 reference/chosen pairs, 3 other policies each
    lines = [sample("p", pol, f"{pol}{i}") for pol, n in (("a", 3), ("b", 1), ("c", 2), ("d", 1)) for i in range(n)]
    out = tmp_path / "pairs.jsonl"
    stats = build_pretrain_pairs([write_lines(tmp_path / "s.jsonl", lines)], out, negatives=negatives)
    rows = read_rows(out)
    assert_pair_rules(rows, lines)
    by_pair = defaultdict(list)
    for r in rows:
        by_pair[r["reference"], r["chosen"]].append(r["rejected_policy"])
    assert len(by_pair) == 5
    for pair, rejected in by_pair.items():
        others = {"a", "b", "c", "d"} - {pair[0][0]}
        assert len(rejected) == len(set(rejected)) == min(negatives, 3) and set(rejected) <= others
    assert (stats.num_rows, stats.num_pairs, stats.num_pairs_short) == (5 * min(negatives, 3), 5, 5 if negatives > 3 else 0)


def test_wrappers_are_separate_groups_and_message_lists_are_flattened(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    lines = [
        sample(chat, "a", [{"role": "assistant", "content": "apple"}]),
        sample("Be brief.\nName a fruit.", "a", "pear"),  # the same prompt text as the message list
        sample(chat, "b", "plum", wrapper="sft"),
        sample(chat, "a", "fig", wrapper="pretrain"),  # another group: no pair
        sample(chat, "b", "kiwi", wrapper="pretrain"),
    ]
    out = tmp_path / "pairs.jsonl"
    stats = build_pretrain_pairs([write_lines(tmp_path / "s.jsonl", lines)], out)
    rows = read_rows(out)
    assert sorted((r["prompt"], r["reference"], r["chosen"], r["rejected"], r["wrapper"]) for r in rows) == [
        ("Be brief.\nName a fruit.", "apple", "pear", "plum", "sft"),
        ("Be brief.\nName a fruit.", "pear", "apple", "plum", "sft"),
    ]
    assert (stats.num_prompts, stats.num_paired_prompts, stats.num_no_repeat, stats.num_no_repeat_samples) == (2, 1, 1, 2)


def test_unpairable_prompts_are_counted_and_reported(tmp_path, capsys):
    lines = [sample("ok", "a", "1"), sample("ok", "a", "2"), sample("ok", "b", "3"),
             sample("solo", "a", "4"), sample("solo", "a", "5"), sample("solo", "a", "6"),  # one policy only
             sample("spread", "a", "7"), sample("spread", "b", "8")]  # no policy with two samples
    data = write_lines(tmp_path / "s.jsonl", lines)
    out = tmp_path / "pairs.jsonl"
    code = main(["pretrain-pairs", "--samples", str(data), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == (
        f"pretrain-pairs: 2 rows (2 reference/chosen pairs) written to {out} from 8 samples of 3 prompts; "
        "1 prompts paired, 1 with one policy only (3 samples), 1 without a policy that has two samples "
        f"(2 samples); 0 pairs have fewer than --negatives rejected policies; one policy only: {data}:4; "
        f"no policy with two samples: {data}:7\n"
    )
    assert "pretrain-pairs: reading" in captured.err  # the progress bar (stderr)
    assert len(read_rows(out)) == 2


def test_no_pair_at_all_is_one_error_with_the_counts(tmp_path, capsys):
    data = write_lines(tmp_path / "s.jsonl", [sample("p", "a", "1"), sample("p", "a", "2"), sample("q", "a", "3")])
    out = tmp_path / "pairs.jsonl"
    code = main(["pretrain-pairs", "--samples", str(data), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1] == (
        f"polar-train: error: {data}: no prompt can form a pair (2 prompts: 2 with one policy only, 0 without a "
        "policy that has two samples) (each prompt needs two samples of one policy and one of another)")
    assert not out.exists() and os.listdir(tmp_path) == ["s.jsonl"]  # no output, no temporary files


# --- 3. Determinism ---------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path):
    rng = random.Random(1)
    files = [write_lines(tmp_path / f"s{i}.jsonl", random_samples(rng, 30)) for i in range(2)]
    outputs = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        outputs[name] = tmp_path / f"{name}.jsonl"
        assert main(["pretrain-pairs", "--samples", *map(str, files), "--output", str(outputs[name]),
                     "--negatives", "2", "--seed", str(seed)]) == 0
    first = outputs["first"].read_bytes()
    assert first == outputs["again"].read_bytes()
    assert first != outputs["other"].read_bytes()
    assert len(first.splitlines()) == len(outputs["other"].read_bytes().splitlines())  # same rule, other draws


@pytest.mark.parametrize("max_bucket_bytes", [300, 5000])
def test_buckets_split_again_when_too_large_and_rows_do_not_depend_on_them(tmp_path, max_bucket_bytes):
    # 300 bytes: more buckets than _MAX_BUCKETS allows, so each is split again (and the one big
    # prompt below cannot be split: it is grouped whole)
    samples = random_samples(random.Random(2), 150)
    samples += [sample("big", f"m{i % 3}", f"long answer {i} " + "z" * 40) for i in range(60)]
    data = write_lines(tmp_path / "s.jsonl", samples)
    reference = tmp_path / "one_bucket.jsonl"
    build_pretrain_pairs([data], reference, negatives=2, max_bucket_bytes=1 << 30)
    out = tmp_path / "pairs.jsonl"
    stats = build_pretrain_pairs([data], out, negatives=2, max_bucket_bytes=max_bucket_bytes)
    # the same rows (each group draws from its own seed); only the order of the groups differs
    assert sorted(out.read_text().splitlines()) == sorted(reference.read_text().splitlines())
    assert stats.num_rows == len(reference.read_text().splitlines())
    assert_pair_rules(read_rows(out), samples)
    assert sorted(os.listdir(tmp_path)) == ["one_bucket.jsonl", "pairs.jsonl", "s.jsonl"]  # buckets removed


# --- 4. Bad rows and arguments: one line, FILE:LINE, exit 2 ----------------------------------

BAD_LINES = {
    "invalid JSON": ('{"prompt": "x", "policy": "a"', "invalid JSON"),
    "not an object": ('["x", "a", "y"]', "the line is a JSON list; expected an object with fields prompt, policy, output"),
    "missing policy": (json.dumps({"prompt": "x", "output": "y"}), "field 'policy' is missing; expected a non-empty string"),
    "missing output": (json.dumps({"prompt": "x", "policy": "a"}), "field 'output' is missing"),
    "missing prompt": (json.dumps({"policy": "a", "output": "y"}), "field 'prompt' is missing"),
    "empty output": (json.dumps({**GOOD, "output": ""}), "field 'output' is empty"),
    "empty prompt": (json.dumps({**GOOD, "prompt": []}), "field 'prompt' is empty"),
    "blank policy": (json.dumps({**GOOD, "policy": "  "}), "field 'policy' is empty"),
    "policy not a string": (json.dumps({**GOOD, "policy": 3}), "field 'policy' is of type integer"),
    "output wrong type": (json.dumps({**GOOD, "output": {"text": "y"}}), "field 'output' is of type object"),
    "message without content": (json.dumps({**GOOD, "prompt": [{"role": "user"}]}), "field 'prompt': message 1 has no 'content'"),
    "unknown wrapper": (json.dumps({**GOOD, "wrapper": "chat"}), "field 'wrapper' is 'chat'; expected one of sft, pretrain"),
    "undecodable bytes": (b'{"prompt": "x\xff", "policy": "a", "output": "y"}', "the line is not valid UTF-8 (byte 0xff at byte 14)"),
    "unpaired surrogate": ('{"prompt": "x", "policy": "a", "output": "y\\ud800"}', "field 'output' holds an unpaired surrogate"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_row_is_one_line_with_file_and_line(case, tmp_path, capsys):
    line, what = BAD_LINES[case]
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    data = write_lines(tmp_path / "s.jsonl", [GOOD, line, GOOD])
    out = tmp_path / "pairs.jsonl"
    code = main(["pretrain-pairs", "--samples", str(good), str(data), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"polar-train: error: {data}:2: {what}")
    assert err.splitlines()[-1].endswith("(fix or remove this line)")
    assert sorted(os.listdir(tmp_path)) == ["good.jsonl", "s.jsonl"]  # no output, no temporary files


@pytest.mark.parametrize("argv, message", [
    (["--negatives", "0"], "--negatives: is 0 (give 1 or more rejected policies per reference/chosen pair)"),
    (["--samples", "missing.jsonl"], "missing.jsonl: samples file not found (give JSONL files of samples to --samples)"),
    (["--samples", "."], ".: is not a file (give JSONL files of samples to --samples)"),
    (["--output", "s.jsonl"], "s.jsonl: the output is also a samples file (write the pairs to another file)"),
    (["--samples", "s.jsonl", "empty.jsonl"],
     "empty.jsonl: no samples (the file must hold one JSON object per line with prompt, policy and output)"),
])
def test_bad_arguments_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "s.jsonl", [GOOD, {**GOOD, "output": "13"}, {**GOOD, "policy": "b"}])
    write_lines(tmp_path / "empty.jsonl", ["", " "])
    code = main(["pretrain-pairs", "--samples", "s.jsonl", "--output", "pairs.jsonl", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"polar-train: error: {message}"
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl", "s.jsonl"]


def test_bad_row_in_a_subprocess(tmp_path):
    data = write_lines(tmp_path / "s.jsonl", [GOOD, GOOD, BAD_LINES["policy not a string"][0]])
    proc = subprocess.run([sys.executable, "-m", "polar_train", "pretrain-pairs", "--samples", str(data),
                           "--output", str(tmp_path / "pairs.jsonl")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "POLAR_TRAIN_DEBUG": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"polar-train: error: {data}:3: field 'policy' is of type integer")
    assert proc.stdout == ""


# --- 5. Memory: bounded by a bucket, not by the file ------------------------------------------

_MEASURE = """
import resource, sys
from polar_train.pretrain_pairs import build_pretrain_pairs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = build_pretrain_pairs([sys.argv[1]], sys.argv[2], negatives=2, max_bucket_bytes=1 << 20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, stats.num_samples, stats.num_rows)
"""


def test_memory_stays_far_below_a_large_input(tmp_path):
    # ~100k samples, ~25 MB, in random order: read whole into Python objects this would take
    # several times its size; grouped a 1 MiB bucket at a time, a few MB
    path = tmp_path / "samples.jsonl"
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(100_000):
            p = rng.randrange(20_000)
            f.write(json.dumps({"prompt": f"prompt {p} " + "x" * 90, "policy": f"model-{rng.randrange(4)}",
                                "output": f"output {i} " + "y" * 100}) + "\n")
    size = path.stat().st_size
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(tmp_path / "pairs.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth, num_samples, num_rows = map(int, proc.stdout.split())
    assert num_samples == 100_000 and num_rows > 100_000
    assert growth < size / 4, f"peak RSS grew by {growth / 2**20:.1f} MiB on a {size / 2**20:.1f} MiB input"


# --- 6. The trainer reads the output (extra fields ignored) -----------------------------------


def test_the_trainer_reads_and_trains_on_the_output(tmp_path, capsys, repo_root, tiny_tokenizer, tiny_tokenizer_path):
    samples = random_samples(random.Random(3), 6)
    out = tmp_path / "pairs.jsonl"
    stats = build_pretrain_pairs([write_lines(tmp_path / "s.jsonl", samples)], out, negatives=2)
    assert {r["wrapper"] for r in read_rows(out)} == {"sft", "pretrain"}
    _, data_stats = load_pair_store([str(out)], tiny_tokenizer, str(tiny_tokenizer_path), max_length=256)
    assert (data_stats.num_rows, data_stats.num_pairs, data_stats.num_skipped) == (stats.num_rows, stats.num_rows, 0)
    code = main(["train", str(repo_root / "configs/demo.yaml"), f"output_dir={tmp_path / 'run'}",
                 f"model.fresh.tokenizer={tiny_tokenizer_path}", f"data.train_files={out}", "data.eval_files=[]",
                 "data.cache_dir=", "data.max_length=256", "data.max_tokens=1024", "model.fresh.hidden_size=16",
                 "model.fresh.num_layers=1", "model.fresh.num_heads=2", "model.fresh.num_kv_heads=1",
                 "model.fresh.intermediate_size=32", "train.pairs_per_step=4", "train.max_steps=1", "train.eval_steps=0"])
    assert code == 0, capsys.readouterr().err
    metrics = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert [(m["step"], m["split"]) for m in metrics if m["split"] == "train"] == [(1, "train")]


def test_shipped_demo_samples_are_what_the_script_writes(tmp_path, repo_root):
    spec = importlib.util.spec_from_file_location("make_demo_samples", repo_root / "scripts" / "make_demo_samples.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out-dir", str(tmp_path)])
    for name in ("demo_samples.jsonl", "demo_samples_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (repo_root / "data" / name).read_bytes()
    train_prompts = {json.loads(line)["prompt"] for line in (tmp_path / "demo_samples.jsonl").read_text().splitlines()}
    eval_prompts = {json.loads(line)["prompt"] for line in (tmp_path / "demo_samples_eval.jsonl").read_text().splitlines()}
    assert train_prompts and eval_prompts and not train_prompts & eval_prompts  # held out


@pytest.mark.slow
def test_pretrain_demo_learns_to_tell_policies_apart(tmp_path, repo_root):
    """configs/pretrain_demo.yaml's three commands, shortened: held-out accuracy from ~0.5 to >= 0.9."""
    pairs = {}
    for split, samples in (("train", "demo_samples.jsonl"), ("eval", "demo_samples_eval.jsonl")):
        pairs[split] = tmp_path / f"{split}.jsonl"
        assert main(["pretrain-pairs", "--samples", str(repo_root / "data" / samples), "--output", str(pairs[split])]) == 0
    out = tmp_path / "run"
    code = main(["train", str(repo_root / "configs/pretrain_demo.yaml"), f"output_dir={out}",
                 f"model.fresh.tokenizer={repo_root / 'data' / 'tokenizer'}", f"data.train_files={pairs['train']}",
                 f"data.eval_files={pairs['eval']}", "data.cache_dir=", "train.max_steps=30", "train.eval_steps=0",
                 "train.min_lr_ratio=1.0"])  # a constant LR: 30 steps instead of the demo's 77
    assert code == 0
    accuracy = {m["step"]: m["accuracy"] for m in read_rows(out / "metrics.jsonl") if m["split"] == "eval"}
    assert sorted(accuracy) == [0, 30]
    assert accuracy[0] < 0.7 and accuracy[30] >= 0.9, accuracy
