"""``polar-train <command>``: argument parsing only; each command is one function elsewhere.

A user mistake (``UserError``) prints one line ``polar-train: error: <where>: <what> (<fix>)``
and exits 2 (1 for a failure inside training); ``--debug`` or ``POLAR_TRAIN_DEBUG=1`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

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

    p = sub.add_parser("score", help="add rewards to JSONL rows (client rows or pair rows)")
    p.add_argument("--model", required=True, help="HF folder of a POLAR reward model")
    p.add_argument("--data", required=True, help="input JSONL: prompt/reference/output rows or pair rows")
    p.add_argument("--output", required=True, help="output JSONL (input fields kept, rewards added)")
    add_inference_args(p)

    p = sub.add_parser("eval", help="accuracy, margins and reward statistics on preference pairs")
    p.add_argument("--model", required=True, help="HF folder of a POLAR reward model")
    p.add_argument("--data", required=True, help="pairs JSONL (prompt, reference, chosen, rejected)")
    p.add_argument("--output-dir", required=True, help="where report.json and the plots go")
    add_inference_args(p)

    p = sub.add_parser("convert", help="turn a saved training checkpoint into a HF folder")
    p.add_argument("checkpoint", help="a checkpoint folder (output_dir/checkpoints/step-N) or a run's output_dir")
    p.add_argument("out_dir", help="HF output folder")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    return parser


def add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-length", type=int, default=16384, help="sequence budget (SPEC 3)")
    p.add_argument("--max-response-length", type=int, default=4096, help="tokens kept of reference/output")
    p.add_argument("--max-tokens", type=int, default=16384, help="micro-batch token budget")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--attention", default="auto", help="auto | flash_attn | torch_varlen | sdpa")


def cmd_train(args: argparse.Namespace) -> int:
    from polar_train.config import load_config
    from polar_train.train import run

    run(load_config(args.config, args.overrides))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from polar_train.config import load_config
    from polar_train.data_report import data_report

    data_report(load_config(args.config, args.overrides))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from polar_train.scoring import cmd_score as run_score

    return run_score(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from polar_train.scoring import cmd_eval as run_eval

    return run_eval(args)


def cmd_convert(args: argparse.Namespace) -> int:
    from polar_train.checkpoint import cmd_convert as run_convert

    return run_convert(args)


COMMANDS = {"train": cmd_train, "data": cmd_data, "score": cmd_score, "eval": cmd_eval, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("POLAR_TRAIN_DEBUG", "") not in ("", "0")
    try:
        # --debug may stand anywhere, also among the key=value overrides
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
        return COMMANDS[args.command](args)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"polar-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("polar-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
