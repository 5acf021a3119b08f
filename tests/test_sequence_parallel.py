"""train.sequence_parallel (issue 18): the settings check, in one line naming the key and the fix.

Only the check is built (see polar_train/engine/sequence_parallel.py): the all-to-all attention
is not, so a run with a valid train.sequence_parallel > 1 is refused in one line too.
"""

from __future__ import annotations

import pytest

from polar_train import cli
from polar_train.config import ConfigError
from polar_train.engine.sequence_parallel import SequenceParallelPlan, plan_sequence_parallel, refuse_unbuilt

from test_errors import assert_one_error, run_cli


@pytest.mark.parametrize("size, world, heads, kv, plan", [
    (1, 1, 32, 8, SequenceParallelPlan(1, 1, 1)),
    (1, 4, 32, 8, SequenceParallelPlan(1, 4, 1)),
    (2, 4, 32, 8, SequenceParallelPlan(2, 2, 1)),
    (8, 8, 32, 8, SequenceParallelPlan(8, 1, 1)),
    (16, 16, 32, 8, SequenceParallelPlan(16, 1, 2)),  # 8 KV heads over 16 ranks: each repeated twice
    (4, 4, 4, 2, SequenceParallelPlan(4, 1, 2)),
])
def test_plan(size, world, heads, kv, plan):
    assert plan_sequence_parallel(size, world, heads, kv) == plan


@pytest.mark.parametrize("size, world, heads, kv, message", [
    (2, 1, 32, 8, "train.sequence_parallel=2: needs one process per rank of the group, this run has 1 process "
                  "(launch with torchrun --nproc_per_node=2 (or a multiple), or set train.sequence_parallel=1)"),
    (4, 6, 32, 8, "train.sequence_parallel=4: the world size 6 is not a multiple of it "
                  "(launch a multiple of 4 processes, or set train.sequence_parallel to a divisor of 6)"),
    (3, 3, 32, 8, "train.sequence_parallel=3: the model's 32 attention heads do not divide by it "
                  "(set train.sequence_parallel to a divisor of 32)"),
    (4, 4, 12, 6, "train.sequence_parallel=4: the model's 6 KV heads neither divide by it nor divide it "
                  "(set train.sequence_parallel to a divisor or a multiple of 6 that divides 12)"),
])
def test_bad_plan_is_one_line(size, world, heads, kv, message):
    with pytest.raises(ConfigError) as info:
        plan_sequence_parallel(size, world, heads, kv)
    assert str(info.value) == message


def test_a_valid_group_is_refused_while_unbuilt():
    refuse_unbuilt(SequenceParallelPlan(1, 4, 1))  # SP=1 trains as before
    with pytest.raises(ConfigError, match=r"^train.sequence_parallel=2: sequence parallelism is not built"):
        refuse_unbuilt(SequenceParallelPlan(2, 2, 1))


@pytest.mark.parametrize("override, where, fix", [
    ("train.sequence_parallel=0", "train.sequence_parallel: must be > 0, got 0", ""),
    ("train.sequence_parallel=2", "train.sequence_parallel=2: needs one process per rank of the group",
     "or set train.sequence_parallel=1"),
])
def test_through_train(override, where, fix, capsys, repo_root, tiny_tokenizer_path, tmp_path):
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml", override, f"output_dir={tmp_path / 'run'}",
                        f"model.fresh.tokenizer={tiny_tokenizer_path}")
    assert_one_error(code, err, 2, where, fix)
