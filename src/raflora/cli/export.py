"""``raflora export``: a run's global adapter in PEFT format, optionally truncated to a rank."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from raflora.cli.common import CLIError
from raflora.cli.runs import load_run_config, user_errors

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``export`` sub-command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="write a run's global adapter (or a rank-r client's) in PEFT format",
        description=(
            "Write the global adapter of RUN_DIR (its last checkpoint) as a PEFT LoRA adapter. "
            "With --rank r it is truncated to what a client of rank r receives, and the share "
            "of the global update's energy it keeps is printed."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    p.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    p.add_argument("--rank", type=int, default=None, help="truncate to this rank")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora export``."""
    from raflora.config import method_options_of
    from raflora.engine import load_checkpoint, write_adapter
    from raflora.methods import get_aggregator

    saved = args.run_dir / "config.yaml"
    if not saved.is_file():
        raise CLIError(f"{args.run_dir}: not a run directory (no config.yaml)")
    config = load_run_config(str(saved), [])
    with user_errors():
        checkpoint = load_checkpoint(args.run_dir)
    # the method's options were parsed once, when the saved config was loaded
    aggregator = get_aggregator(config.method, config.fl.rank_levels, method_options_of(config))
    try:
        result = write_adapter(
            args.out, aggregator, checkpoint.state, checkpoint.meta, rank=args.rank
        )
    except ValueError as err:
        raise CLIError(f"--rank: {err}") from None
    except OSError as err:  # the previous adapter at --out, if any, is left as it was
        raise CLIError(f"cannot write {err.filename or args.out}: {err.strerror or err}") from None
    print(
        f"wrote a rank-{result.rank} PEFT adapter to {result.path} "
        f"(round {checkpoint.round}); it keeps {100 * result.energy_kept:.2f}% of the global "
        f"update's energy"
    )
    return 0
