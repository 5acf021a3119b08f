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
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a reward model (one process or under torchrun)")
    p.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    p = sub.add_parser("data", help="token, packing and shared-prefix statistics of the configured data")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


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


COMMANDS = {"train": cmd_train, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("POLAR_TRAIN_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
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
