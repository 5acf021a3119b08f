"""fp16 with a dynamic loss scale: ZeRO-0 must learn what ZeRO-2 learns.

DeepSpeed 0.19 scales the loss only for ZeRO optimizers, while its stage-0 fp16 optimizer still
unscales the gradients: without the engine's own scaling, ZeRO-0 fp16 trains on gradients 2^16
times too small (AdamW's eps then dominates and the loss barely moves).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_resume import make_run_folder, metric_rows, train  # noqa: F401


@pytest.mark.slow
def test_zero0_and_zero2_fp16_follow_the_same_trajectory(tmp_path: Path) -> None:
    folder = make_run_folder(tmp_path)
    rows = {}
    for stage in (0, 2):
        out = f"fp16-zero{stage}"
        train(folder, f"output_dir={out}", "train.max_steps=4", "train.log_steps=1", "train.precision=fp16",
              "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}", "data.eval_files=[]")
        rows[stage] = [r for r in metric_rows(folder / out) if r["split"] == "train"]
    # step 1 sees the same weights and data: the same (unscaled) gradient norm
    assert rows[0][0]["grad_norm"] == pytest.approx(rows[2][0]["grad_norm"], rel=1e-4), (rows[0], rows[2])
    # and ZeRO-0 learns at ZeRO-2's pace (without the engine's scaling: about a quarter of it)
    progress = {stage: r[0]["loss"] - r[-1]["loss"] for stage, r in rows.items()}
    assert progress[2] > 0 and progress[0] >= 0.5 * progress[2], progress
