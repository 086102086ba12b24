"""Compatibility alias: the methods moved to :mod:`raflora.methods` (0.2).

``from raflora.aggregators import …`` keeps working for code written against 0.1; new code
imports :mod:`raflora.methods`.
"""

from raflora.methods import *  # noqa: F403
from raflora.methods import __all__ as __all__
