"""The ``raflora`` command line: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from raflora import __version__
from raflora.cli import compare, config, export, privacy, run, sweep, theory
from raflora.cli.common import CLIError

__all__ = ["main"]

_COMMANDS = (run, compare, sweep, export, theory, privacy, config)


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


def _quiet_libraries(quiet: bool) -> None:
    """Silence library chatter that says nothing to a user of this tool.

    Always: transformers' info logs and a deprecation warning PEFT triggers. With ``--quiet``
    also the progress bars of transformers, datasets and the Hugging Face hub, and Flower's
    INFO logs (Ray's are silenced where the simulation starts it); warnings and errors still
    show.
    """
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    if not quiet:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    with contextlib.suppress(ImportError):  # the flower extra may be absent
        from flwr.common.logger import update_console_handler

        update_console_handler(level=logging.WARNING)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with options and ``key=value`` overrides in any order.

    argparse stops filling the ``overrides`` positional at the first option, so
    ``raflora run CONFIG --quiet fl.rounds=3`` would leave ``fl.rounds=3`` unrecognized: such
    trailing arguments are appended to the overrides, in order. An unknown option is still an
    error.
    """
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``raflora`` console script; returns the exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    _quiet_libraries(bool(getattr(args, "quiet", False)))
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
