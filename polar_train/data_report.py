"""``polar-train data CONFIG``: what the configured data costs before any training starts.

Per split: rows (pairs and ranked lists), implied pairs, tokens, dropped and truncated counts,
pairs that teach nothing (chosen and rejected encode to the same ids), length percentiles,
micro-batches per epoch, fill ratio (real tokens / budget), the tokens the shared prefix saves
and the tokens lists save against their expansion into pair rows (each with its shared prefix).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from polar_train.config import DataSection, DeepSpeedSection, ModelSection, TrainSection
import numpy as np
import pyarrow.compute as pc

from polar_train.model.internlm2 import ModelConfig
from polar_train.packing import GroupLengths, StepPlanner
from polar_train.reporting import setup_logging
from polar_train.rundir import preflight
from polar_train.store_build import load_pair_store
from polar_train.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger("polar_train")


def percentiles(values: np.ndarray | list[int], qs=(50, 90, 99, 100)) -> dict[str, int]:
    """Nearest-rank percentiles. >>> percentiles([1, 2, 3, 4], (50, 100))
    {'p50': 2, 'p100': 4}"""
    if not len(values):
        return {f"p{q}": 0 for q in qs}
    s = np.sort(np.asarray(values))
    return {f"p{q}": int(s[max(0, -(-q * len(s) // 100) - 1)]) for q in qs}


def packing_stats(
    lengths: GroupLengths, *, max_tokens: int, pairs_per_step: int, shared_prefix: bool,
    share_max_len: int | None, seed: int, num_ranks: int = 1,
) -> dict[str, Any]:
    """Micro-batches and fill ratio of one epoch as training would pack it."""
    plain = lengths.costs(False)
    costs = lengths.costs(shared_prefix, share_max_len)
    kept = costs <= max_tokens
    planner = StepPlanner(costs[kept], pairs_per_step=pairs_per_step, max_tokens=max_tokens, num_ranks=num_ranks,
                          seed=seed)
    num_mb = sum(len(rank) for k in range(planner.steps_per_epoch) for rank in planner.plan(0, k))
    real, unshared = int(costs[kept].sum()), int(plain[kept].sum())
    return {
        "pairs_over_budget": int(len(costs) - kept.sum()),
        "steps_per_epoch": planner.steps_per_epoch,
        "micro_batches": num_mb,
        "tokens_computed": real,
        "fill_ratio": real / max(1, num_mb * max_tokens),
        "tokens_saved_by_shared_prefix": unshared - real,
        "shared_prefix_saving": 1 - real / max(1, unshared),
    }


def data_report(*, model: ModelSection, data: DataSection, train: TrainSection, deepspeed: DeepSpeedSection,
                seed: int) -> dict[str, Any]:
    """``polar-train data``: token, packing and shared-prefix figures of the configured data (printed as JSON)."""
    setup_logging()
    preflight(data, model, deepspeed)
    tok_path = model.path or model.fresh.tokenizer
    tokenizer = load_tokenizer(tok_path, trust_remote_code=model.trust_remote_code)
    share_max_len = None
    config_id = None
    if model.path:
        mcfg = ModelConfig.from_file(f"{model.path}/config.json")
        share_max_len = mcfg.share_max_len
        config_id = mcfg.reward_token_id
    special_token_ids(tokenizer, config_id)
    report: dict[str, Any] = {}
    for split, files in (("train", data.train_files), ("eval", data.eval_files)):
        if not files:
            continue
        store, stats = load_pair_store(
            list(files), tokenizer, tok_path, max_length=data.max_length,
            max_response_length=data.max_response_length, cache_dir=data.cache_dir or None,
            on_error=data.on_error, num_proc=data.num_proc,
        )
        lengths = store.lengths()
        # every sequence's length, from the list offsets alone
        sequence_lengths = pc.list_value_length(pc.list_flatten(store.table.column("seqs"))).to_numpy()
        log.info("%s data: %s tokens/s tokenizing (%s)", split, f"{stats.tokens_per_s:.0f}",
                 "cache hit: the figure of the run that built the cache" if stats.cache_hit
                 else f"{data.num_proc} process(es)")
        report[split] = {
            "files": list(files),
            **stats.as_dict(),
            "tokens": int(sequence_lengths.sum(dtype=np.int64)),
            "sequence_length": percentiles(sequence_lengths),
            "tokens_saved_by_lists": stats.tokens_as_pairs - stats.tokens_as_lists,
            **packing_stats(
                lengths, max_tokens=data.max_tokens, pairs_per_step=train.pairs_per_step,
                shared_prefix=data.shared_prefix, share_max_len=share_max_len, seed=seed,
            ),
        }
    print(json.dumps(report, indent=2))
    return report
