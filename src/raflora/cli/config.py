"""``raflora config``: every configuration key with its help, a resolved configuration, the
JSON Schema of config files, or the configuration reference (``docs/configuration.md``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from raflora.cli.common import CLIError
from raflora.cli.runs import add_config_arguments, load_run_config, split_config_args
from raflora.config import config_markdown, config_schema, config_to_dict, describe_config

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``config`` sub-command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "config",
        help="list every config key and method option, or print a resolved (validated) config",
        description=(
            "Without arguments: every configuration key with its default and help, then every "
            "method's options. With CONFIG and/or key=value overrides: the resolved "
            "configuration as YAML (after validation). --schema: the JSON Schema (draft "
            "2020-12) of config files, for editors and checkers; --markdown: the configuration "
            "reference (docs/configuration.md)."
        ),
    )
    add_config_arguments(p, optional=True)
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--schema", action="store_true", help="print the JSON Schema of run config files"
    )
    what.add_argument(
        "--markdown", action="store_true", help="print the configuration reference as Markdown"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``raflora config``."""
    path, overrides = split_config_args(args.config, args.overrides)
    if args.schema or args.markdown:
        if path is not None or overrides:
            raise CLIError("--schema and --markdown take no CONFIG or overrides")
        text = json.dumps(config_schema(), indent=2) + "\n" if args.schema else config_markdown()
        print(text, end="")
        return 0
    if path is None and not overrides:
        print(describe_config())
        return 0
    config = load_run_config(path, overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return 0
