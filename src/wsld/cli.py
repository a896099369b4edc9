"""Command line: ``wsld train | eval | data ... | compare | demo | soft-labels | export``.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``; the parser's
``func(args) -> int`` runs it. A ``UserError`` anywhere becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading

from wsld import __version__, console_log
from wsld.errors import UserError

# modules that register sub-commands, in the order --help lists them
COMMAND_MODULES = [
    "wsld.commands.train",
    "wsld.commands.evaluate",
    "wsld.commands.data",
    "wsld.commands.compare",
    "wsld.commands.demo",
    "wsld.commands.soft_labels",
    "wsld.commands.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsld",
        description="Knowledge distillation of image classifiers with Weighted Soft Label Distillation "
        "(Zhou et al., ICLR 2021). Run 'wsld train' with no arguments for the built-in default: "
        "WSLD on Fashion-MNIST, CIFAR ResNet teacher cifar_resnet20_s2 -> student cifar_resnet8_s2.",
    )
    parser.add_argument("--version", action="version", version=f"wsld {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # not built yet in this version
                continue
            raise
        mod.add_parser(sub)
    return parser


def one_line(err: BaseException) -> str:
    """The user's line: a UserError re-raised from a DataLoader worker carries the worker's traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        prefix = f"{type(err).__name__}: "
        text = last.split(prefix, 1)[1] if prefix in last else last
    return text.splitlines()[0] if text else type(err).__name__


def continue_hint(run_dir) -> str:
    """How to go on after a Ctrl-C that the trainer did not catch (a second Ctrl-C, or one outside a training loop)."""
    if run_dir is None:
        return ""
    if (run_dir / "config.yaml").is_file():
        saved = "from its last checkpoint" if (run_dir / "last.pt").is_file() else "from the start (no checkpoint yet)"
        return f"; continue {saved} with: wsld train --resume {run_dir}"
    return f"; nothing was written to {run_dir} yet: run the same command again (a teacher being trained resumes from its cache)"


def quiet_thread_errors(args: threading.ExceptHookArgs) -> None:
    """A library's background thread that fails (TensorBoard's event writer on a full disk) says
    so in one line; what matters to the run is reported by the main thread."""
    if issubclass(args.exc_type, OSError):
        name = args.thread.name if args.thread is not None else "a background thread"
        print(f"[wsld] warning: {name} stopped: {one_line(args.exc_value) if args.exc_value else args.exc_type.__name__}", file=sys.stderr)
        return
    threading.__excepthook__(args)


def main(argv: list[str] | None = None) -> int:
    threading.excepthook = quiet_thread_errors
    parser = build_parser()
    # `wsld train CONFIG --out DIR key=value ...`: argparse stops filling a positional list at an
    # option, so key=value items after it come back as extras; a command that takes them names its
    # list in `extra_args_dest` (anything else, or an unknown --option, is the usual usage error)
    args, extra = parser.parse_known_args(argv)
    if extra:
        dest = getattr(args, "extra_args_dest", None)
        hint = getattr(args, "unknown_option_hint", None)  # a habit from another tool: the command that works
        if hint is not None and any(e.startswith("-") for e in extra) and (line := hint(list(sys.argv[1:] if argv is None else argv))):
            print(f"wsld: error: {line}", file=sys.stderr)
            return 2
        if dest is None or any(e.startswith("-") for e in extra):
            parser.parse_args(argv)  # prints "unrecognized arguments" and exits 2
        getattr(args, dest).extend(extra)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # a training command keeps its console output in the run folder (log.txt): wsld.console_log
    with console_log.capture(getattr(args, "keeps_console_log", False), list(sys.argv[1:] if argv is None else argv)):
        try:
            return int(args.func(args) or 0)
        except UserError as e:
            print(f"wsld: error: {one_line(e)}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print(f"wsld: interrupted{continue_hint(getattr(args, 'run_dir_in_use', None))}", file=sys.stderr)
            return 130
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
