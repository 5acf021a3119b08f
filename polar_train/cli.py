"""``polar-train <command>``: argument parsing only; each command is one function elsewhere.

A user mistake (``UserError``) prints one line ``polar-train: error: <where>: <what> (<fix>)``
and exits 2 (1 for a failure inside training). Common failures of the machine rather than the
code (an ``OSError`` such as permission denied or disk full, running out of memory) print one
line too, naming the path, and exit 1. ``--debug`` or ``POLAR_TRAIN_DEBUG=1`` adds the
traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from polar_train.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polar-train", description="Fine-tune POLAR reward models.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a reward model (one process or under torchrun)")
    p.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    p = sub.add_parser("data", help="token, packing and shared-prefix statistics of the configured data")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    p = sub.add_parser("score", help="add rewards to JSONL rows (client, pair or candidates-list rows)")
    p.add_argument("--model", required=True, help="HF folder of a POLAR reward model")
    p.add_argument("--data", required=True, help="input JSONL: prompt/reference/output rows or pair rows")
    p.add_argument("--output", required=True, help="output JSONL (input fields kept, rewards added)")
    p.add_argument("--normalize", action="store_true",
                   help="write (reward - mean) / std with the model's reward_stats.json (its training eval)")
    add_inference_args(p)

    p = sub.add_parser("eval", help="accuracy, margins and reward statistics on pairs and ranked lists")
    p.add_argument("--model", required=True, help="HF folder of a POLAR reward model")
    p.add_argument("--data", required=True, help="JSONL pair rows and ranked lists, as train reads them")
    p.add_argument("--output-dir", required=True, help="where report.json and the plots go")
    add_inference_args(p)

    p = sub.add_parser("convert", help="turn a saved training checkpoint into a HF folder")
    p.add_argument("checkpoint", help="a checkpoint folder (output_dir/checkpoints/step-N) or a run's output_dir")
    p.add_argument("out_dir", help="HF output folder")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")

    p = sub.add_parser("pretrain-pairs", help="pre-training pairs from policy samples (POLAR's policy discrimination)")
    p.add_argument("--samples", required=True, nargs="+", metavar="FILE",
                   help="JSONL samples: prompt, policy, output, optional wrapper; rows in any order")
    p.add_argument("--output", required=True, metavar="FILE", help="output JSONL pair rows for `train`")
    p.add_argument("--negatives", type=int, default=1, metavar="N",
                   help="rows per reference/chosen pair, each with a different rejected policy (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles and draws (same seed, same output)")

    p = sub.add_parser("serve", help="HTTP reward server for RL: the protocols POLAR's client speaks (SPEC 13)")
    p.add_argument("--model", required=True, help="HF folder of a POLAR reward model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=30000, help="port (POLAR's client default: 30000)")
    p.add_argument("--max-batch-delay-ms", type=float, default=5.0,
                   help="how long the first waiting request waits for others to batch with (0: no wait)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; beyond, 503 at once")
    p.add_argument("--pooling-format", default="vllm", choices=["vllm", "lmdeploy"],
                   help="the answer shape of POST /pooling: the client's server_type (same request body)")
    p.add_argument("--log-every", type=int, default=100, help="one log line per N requests (0: none)")
    add_inference_args(p)
    return parser


def add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-length", type=int, default=16384, help="sequence budget (SPEC 3)")
    p.add_argument("--max-response-length", type=int, default=4096, help="tokens kept of reference/output")
    p.add_argument("--max-tokens", type=int, default=16384, help="micro-batch token budget")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--attention", default="auto", help="auto | flash_attn | torch_varlen | sdpa")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the tokenizer code shipped in --model (tokenization_*.py) to run")


def cmd_train(args: argparse.Namespace) -> int:
    from polar_train.config import load_config
    from polar_train.train import run

    run(load_config(args.config, args.overrides))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from polar_train.config import load_config
    from polar_train.data_report import data_report

    cfg = load_config(args.config, args.overrides)
    data_report(model=cfg.model, data=cfg.data, train=cfg.train, deepspeed=cfg.deepspeed, seed=cfg.seed)
    return 0


def _scoring_options(args: argparse.Namespace) -> dict[str, int]:
    for flag, value, least in (("--max-length", args.max_length, 5),
                               ("--max-response-length", args.max_response_length, 1),
                               ("--max-tokens", args.max_tokens, 1)):
        if value < least:
            raise UserError(flag, f"is {value}", f"expected at least {least}")
    return {"max_length": args.max_length, "max_response_length": args.max_response_length,
            "max_tokens": args.max_tokens}


def _scorer(args: argparse.Namespace) -> tuple[Any, Any]:
    """``scoring.load_scorer`` for ``score`` / ``eval``, after a header-only check of the model folder
    (a damaged download is one line naming the file, before any weight loads)."""
    from polar_train.rundir import check_model_folder
    from polar_train.scoring import load_scorer

    check_model_folder(args.model, key="--model")
    return load_scorer(args.model, device=args.device, dtype=args.dtype, attention=args.attention,
                       trust_remote_code=args.trust_remote_code)


def cmd_score(args: argparse.Namespace) -> int:
    """``polar-train score --model DIR --data IN.jsonl --output OUT.jsonl``."""
    from polar_train.evaluate import read_reward_stats
    from polar_train.reporting import setup_logging
    from polar_train.scoring import score_file

    setup_logging()
    options = _scoring_options(args)
    normalize = read_reward_stats(args.model) if args.normalize else None  # before loading any weight
    model, tokenizer = _scorer(args)
    score_file(model, tokenizer, args.data, args.output, normalize=normalize, **options)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``polar-train eval --model DIR --data pairs_and_lists.jsonl --output-dir D``."""
    from polar_train.reporting import setup_logging
    from polar_train.scoring import eval_file

    setup_logging()
    options = _scoring_options(args)
    model, tokenizer = _scorer(args)
    settings = {"model": str(args.model), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "device": str(next(model.parameters()).device), "attention": model.attention}
    eval_file(model, tokenizer, args.data, args.output_dir, settings=settings, **options)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from polar_train.export import convert

    out = convert(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size)
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``polar-train serve --model DIR``: until SIGTERM / SIGINT, then exit 0."""
    from polar_train.reporting import setup_logging
    from polar_train.serve import Scorer
    from polar_train.serve_http import build_app, serve

    setup_logging()
    options = _scoring_options(args)
    for flag, value, least in (("--port", args.port, 0), ("--max-queue", args.max_queue, 1),
                               ("--max-batch-delay-ms", args.max_batch_delay_ms, 0),
                               ("--log-every", args.log_every, 0)):
        if value < least:
            raise UserError(flag, f"is {value}", f"expected at least {least}")
    model, tokenizer = _scorer(args)
    scorer = Scorer(model, tokenizer, max_tokens=args.max_tokens, max_length=args.max_length)
    app = build_app(scorer, delay_ms=args.max_batch_delay_ms, max_queue=args.max_queue,
                    pooling_format=args.pooling_format, max_length=options["max_length"],
                    max_response_length=options["max_response_length"], log_every=args.log_every)
    serve(app, args.host, args.port)
    return 0


def cmd_pretrain_pairs(args: argparse.Namespace) -> int:
    """``polar-train pretrain-pairs``: build the pairs, print the summary line on stdout."""
    from polar_train.pretrain_pairs import build_pretrain_pairs

    stats = build_pretrain_pairs(args.samples, args.output, negatives=args.negatives, seed=args.seed, progress=True)
    print(f"pretrain-pairs: {stats.summary(str(args.output))}", flush=True)
    return 0


COMMANDS = {"train": cmd_train, "data": cmd_data, "score": cmd_score, "eval": cmd_eval, "convert": cmd_convert,
            "pretrain-pairs": cmd_pretrain_pairs, "serve": cmd_serve}


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks of path arguments, before any model loads (``--device`` is checked by scoring)."""
    model = getattr(args, "model", None)
    if model is not None and not Path(model).is_dir():
        what = "is a file, not a model folder" if Path(model).exists() else "model folder not found"
        raise UserError(model, f"{what} (--model)",
                        "give a Hugging Face checkpoint folder with config.json, weights and tokenizer")
    data = getattr(args, "data", None)
    if data is not None and not Path(data).is_file():
        what = "is not a file" if Path(data).exists() else "data file not found"
        raise UserError(data, f"{what} (--data)", "give a JSONL file, one JSON object per line")
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and not Path(checkpoint).exists():
        raise UserError(checkpoint, "checkpoint not found", "give output_dir/checkpoints/step-N or a run's output_dir")


_OS_ERROR_FIXES = {
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free space or choose another output_dir",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another output_dir",
    errno.ENOENT: "check that the path and its parent folders exist",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder: give a file",
}


def describe_os_error(error: OSError) -> str:
    """``<path>: <what> (<fix>)`` for an OSError, e.g. ``runs/x/hf: Permission denied (check ...)``."""
    where = error.filename if error.filename is not None else "system"
    if error.filename2 is not None:
        where = f"{error.filename} -> {error.filename2}"
    what = error.strerror or str(error)
    fix = _OS_ERROR_FIXES.get(error.errno or 0, "check the path and the machine's disk")
    return f"{where}: {what} ({fix})"


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("POLAR_TRAIN_DEBUG", "") not in ("", "0")
    args = None
    try:
        # --debug may stand anywhere, also among the key=value overrides
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
        check_args(args)
        return COMMANDS[args.command](args)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"polar-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the machine, not the code: permission denied, disk full, ...
        if debug:
            traceback.print_exc()
        print(f"polar-train: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        if debug:
            traceback.print_exc()
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fix = ("lower --max-tokens" if getattr(args, "command", None) in ("score", "eval") else
               "lower data.max_tokens, set model.gradient_checkpointing=true, or use more GPUs / ZeRO-3")
        print(f"polar-train: error: out of memory: {first_line} ({fix})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("polar-train: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console script and ``python -m polar_train``: ``main()``, then the process exit.

    After a DeepSpeed run (a process group existed in this process) the interpreter's teardown
    is skipped: gloo's and DeepSpeed's native threads can abort it with ``terminate called
    without an active exception`` (exit -6) even after a barrier and ``destroy_process_group()``
    (SPEC 8; seen here on a fresh CI clone). Every file is closed by then, so nothing is lost.
    """
    try:
        code = main()
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # a bug: show it, and still exit cleanly below
        traceback.print_exc()
        code = 1
    if "deepspeed" in sys.modules:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
