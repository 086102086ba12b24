"""Helpers shared by the sub-commands."""

from __future__ import annotations

__all__ = ["CLIError", "parse_float_list", "parse_int_list"]


class CLIError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def parse_int_list(text: str, what: str) -> list[int]:
    """``"8,16,32"`` → ``[8, 16, 32]``; a clear :class:`CLIError` otherwise."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_float_list(text: str, what: str) -> list[float]:
    """``"0.2,0.8"`` → ``[0.2, 0.8]``; a clear :class:`CLIError` otherwise."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from None
