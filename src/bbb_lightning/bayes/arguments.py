"""Type predicates for the arguments of public constructors and functions.

numpy's numbers pass (``labels.max() + 1`` is a ``numpy.int64``); bools do not, though Python
counts them as integers (``num_samples=True`` is a mistake, not 1).
"""

from __future__ import annotations

import numbers
from typing import Any


def is_real(value: object) -> bool:
    """A real number, not a bool, a string or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """An integral number, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_integer(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is an integral number >= 1 (numpy's included, not a bool);
    else a ValueError naming ``name``, the value and what is allowed."""
    if not (is_integer(value) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
