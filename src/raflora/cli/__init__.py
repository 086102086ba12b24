"""The ``raflora`` command line: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from raflora import __version__
from raflora.cli import compare, config, export, run, theory
from raflora.cli.common import CLIError

__all__ = ["main"]

_COMMANDS = (run, compare, export, theory, config)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="raflora",
        description="Federated LoRA fine-tuning with heterogeneous ranks (raFLoRA and baselines).",
    )
    parser.add_argument("--version", action="version", version=f"raflora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.register(sub)
    return parser


def _quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user of this tool."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``raflora`` console script; returns the exit code."""
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except CLIError as err:
        print(f"raflora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"raflora {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
