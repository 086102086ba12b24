"""``raflora config``: every configuration key with its help, or a resolved configuration."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from raflora.cli.runs import load_run_config, split_config_args
from raflora.config import config_to_dict, describe_config

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``config`` sub-command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "config",
        help="list every config key and method option, or print a resolved (validated) config",
        description=(
            "Without arguments: every configuration key with its default and help, then every "
            "method's options. With CONFIG and/or key=value overrides: the resolved "
            "configuration as YAML (after validation)."
        ),
    )
    p.add_argument("config", nargs="?", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora config``."""
    path, overrides = split_config_args(args.config, args.overrides)
    if path is None and not overrides:
        print(describe_config())
        return 0
    config = load_run_config(path, overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return 0
