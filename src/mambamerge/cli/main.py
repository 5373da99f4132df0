"""`mambamerge <command>`: one entry point; each command lives in its own module. The arguments are
parsed before torch is imported (the command modules import it when they run), so `--help` and argument
errors are instant."""
import argparse
import functools
import os
import signal
import sys
import warnings
from typing import List, Optional

from mambamerge import __version__
from mambamerge.cli import demo, info, speed, sweep, train, tune
from mambamerge.cli import eval as eval_command  # not `eval`: that name is a builtin
from mambamerge.cli import diagnose, visualize

COMMANDS = {"demo": demo, "eval": eval_command, "sweep": sweep, "train": train, "speed": speed, "info": info}
COMMANDS.update(tune=tune, diagnose=diagnose, visualize=visualize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambamerge", description="Token merging for vision State Space Models.",
                                     epilog="examples:\n  mambamerge demo\n  mambamerge <command> --help",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mambamerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module in COMMANDS.items():
        examples = "examples:\n" + "\n".join(f"  mambamerge {name} {line}".rstrip() for line in module.EXAMPLES)
        module.add_parser(sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=examples,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def _warn(message, category, filename, lineno, file=None, line=None, *, command: str) -> None:
    print(f"mambamerge {command}: warning: {message}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_warn, command=args.command)
            code = COMMANDS[args.command].run(args) or 0
        sys.stdout.flush()
        return code
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        print(f"mambamerge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mambamerge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`mambamerge info x.pth | head -3`): stop quietly, as cat would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
