"""The engines' error type (imported by every engine module, so it lives below them all)."""

from __future__ import annotations

__all__ = ["EngineError"]


class EngineError(RuntimeError):
    """The run cannot be set up as configured (message says what to change)."""
