"""`mambamerge <command>`: one entry point; each command lives in its own module."""
import argparse
import sys
from typing import List, Optional

from mambamerge.checkpoint import CheckpointError
from mambamerge.cli import demo, info, speed, sweep, train
from mambamerge.cli import eval as eval_command  # not `eval`: that name is a builtin
from mambamerge.cli import diagnose, visualize

COMMANDS = {"demo": demo, "eval": eval_command, "sweep": sweep, "train": train, "speed": speed, "info": info}
COMMANDS.update(diagnose=diagnose, visualize=visualize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambamerge", description="Token merging for vision State Space Models.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"mambamerge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mambamerge {args.command}: interrupted", file=sys.stderr)
        return 130
