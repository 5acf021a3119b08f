"""``polar-train data CONFIG``: what the configured data costs before any training starts.

Per split: pairs, tokens, dropped and truncated counts, length percentiles, micro-batches per
epoch, fill ratio (real tokens / budget) and the tokens the shared prefix saves.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from polar_train.config import Config
from polar_train.data import load_pair_dataset
from polar_train.model.internlm2 import ModelConfig
from polar_train.packing import StepPlanner, pair_cost
from polar_train.reporting import setup_logging
from polar_train.rundir import preflight
from polar_train.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger("polar_train")


def percentiles(values: list[int], qs=(50, 90, 99, 100)) -> dict[str, int]:
    """Nearest-rank percentiles. >>> percentiles([1, 2, 3, 4], (50, 100))
    {'p50': 2, 'p100': 4}"""
    if not values:
        return {f"p{q}": 0 for q in qs}
    s = sorted(values)
    return {f"p{q}": s[max(0, -(-q * len(s) // 100) - 1)] for q in qs}


def packing_stats(
    pairs: list[tuple[list[int], list[int]]], *, max_tokens: int, pairs_per_step: int, shared_prefix: bool,
    share_max_len: int | None, seed: int, num_ranks: int = 1,
) -> dict[str, Any]:
    """Micro-batches and fill ratio of one epoch as training would pack it."""
    plain = [pair_cost(c, r, False) for c, r in pairs]
    costs = [pair_cost(c, r, shared_prefix, share_max_len) for c, r in pairs]
    kept = [i for i, c in enumerate(costs) if c <= max_tokens]
    planner = StepPlanner([costs[i] for i in kept], pairs_per_step=pairs_per_step, max_tokens=max_tokens, num_ranks=num_ranks, seed=seed)
    num_mb = sum(len(rank) for k in range(planner.steps_per_epoch) for rank in planner.plan(0, k))
    real = sum(costs[i] for i in kept)
    return {
        "pairs_over_budget": len(pairs) - len(kept),
        "steps_per_epoch": planner.steps_per_epoch,
        "micro_batches": num_mb,
        "tokens_computed": real,
        "fill_ratio": real / max(1, num_mb * max_tokens),
        "tokens_saved_by_shared_prefix": sum(plain[i] for i in kept) - real,
        "shared_prefix_saving": 1 - real / max(1, sum(plain[i] for i in kept)),
    }


def data_report(cfg: Config) -> dict[str, Any]:
    setup_logging()
    preflight(cfg)
    tok_path = cfg.model.path or cfg.model.fresh.tokenizer
    tokenizer = load_tokenizer(tok_path, trust_remote_code=cfg.model.trust_remote_code)
    share_max_len = None
    config_id = None
    if cfg.model.path:
        mcfg = ModelConfig.from_file(f"{cfg.model.path}/config.json")
        share_max_len = mcfg.share_max_len
        config_id = mcfg.reward_token_id
    special_token_ids(tokenizer, config_id)
    report: dict[str, Any] = {}
    for split, files in (("train", cfg.data.train_files), ("eval", cfg.data.eval_files)):
        if not files:
            continue
        dataset, stats = load_pair_dataset(
            list(files), tokenizer, tok_path, max_length=cfg.data.max_length,
            max_response_length=cfg.data.max_response_length, cache_dir=cfg.data.cache_dir or None,
            on_error=cfg.data.on_error,
        )
        pairs = list(zip(dataset["chosen_ids"], dataset["rejected_ids"]))
        lengths = [len(s) for pair in pairs for s in pair]
        report[split] = {
            "files": list(files),
            **stats.as_dict(),
            "tokens": sum(lengths),
            "sequence_length": percentiles(lengths),
            **packing_stats(
                pairs, max_tokens=cfg.data.max_tokens, pairs_per_step=cfg.train.pairs_per_step,
                shared_prefix=cfg.data.shared_prefix, share_max_len=share_max_len, seed=cfg.seed,
            ),
        }
    print(json.dumps(report, indent=2))
    return report
