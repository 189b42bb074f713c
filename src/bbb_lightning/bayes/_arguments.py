"""Type predicates for the arguments of public constructors and functions.

numpy's numbers pass (``labels.max() + 1`` is a ``numpy.int64``); bools do not, though Python
counts them as integers (``num_samples=True`` is a mistake, not 1).
"""

from __future__ import annotations

import numbers


def is_real(value: object) -> bool:
    """A real number, not a bool, a string or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """An integral number, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
