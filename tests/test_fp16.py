"""fp16 with a dynamic loss scale: ZeRO-0 must follow ZeRO-2's trajectory.

Two DeepSpeed 0.19 stage-0 fp16 quirks the engine corrects (see DeepSpeedEngine):
- it scales the loss only for ZeRO optimizers while its stage-0 fp16 optimizer still unscales the
  gradients: without the engine's own scaling ZeRO-0 trains on gradients 2^16 times too small;
- FP16_UnfusedOptimizer runs one AdamW step on zero gradients when it is built (step count 1,
  weight decay once on the fp32 masters): without undoing it every bias correction is a step
  ahead and the runs part from step 2 on (step-4 loss 0.6886 vs 0.6869, grad norm 0.14 vs 0.17).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_resume import make_run_folder, metric_rows, train  # noqa: F401


def cpu_without_fp16() -> bool:
    """DeepSpeed's CPU accelerator refuses fp16 ("Type fp16 is not supported on your device") where
    oneDNN has no fp16 kernels (e.g. AMD EPYC hosts): the test needs a CPU that has them, or a GPU."""
    import torch

    return not torch.cuda.is_available() and not torch.ops.mkldnn._is_mkldnn_fp16_supported()


@pytest.mark.slow
@pytest.mark.skipif(cpu_without_fp16(), reason="DeepSpeed refuses fp16 on this CPU (no oneDNN fp16)")
def test_zero0_and_zero2_fp16_follow_the_same_trajectory(tmp_path: Path) -> None:
    folder = make_run_folder(tmp_path)
    rows = {}
    for stage in (0, 2):
        out = f"fp16-zero{stage}"
        # weight decay on: the build-time step also decayed the ZeRO-0 masters once
        train(folder, f"output_dir={out}", "train.max_steps=4", "train.log_steps=1", "train.precision=fp16",
              "train.weight_decay=0.1", "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}",
              "data.eval_files=[]")
        rows[stage] = [r for r in metric_rows(folder / out) if r["split"] == "train"]
    assert len(rows[0]) == len(rows[2]) == 4
    assert all(r["loss_scale"] == 2.0**16 for r in rows[0] + rows[2]), (rows[0], rows[2])  # no overflow skips
    # the same weights, data and updates: the same losses and (unscaled) gradient norms at every step
    # (measured equal to ~1e-8; fp16 ZeRO-0 and ZeRO-2 only sum the same gradients differently)
    for key in ("loss", "grad_norm"):
        zero0, zero2 = [r[key] for r in rows[0]], [r[key] for r in rows[2]]
        assert zero0 == pytest.approx(zero2, rel=1e-5, abs=0), (key, zero0, zero2)
    assert rows[2][0]["loss"] - rows[2][-1]["loss"] > 0  # and it learns
