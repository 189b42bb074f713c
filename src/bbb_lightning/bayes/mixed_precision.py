"""Mixed precision for our autograd Functions that multiply activations.

Under autocast (``trainer.precision=bf16-mixed``), ``F.linear`` and ``torch.bmm`` cast their
float32 inputs to the autocast dtype. A custom ``torch.autograd.Function`` whose forward calls
them returns bfloat16 (or float16) outputs, so its backward receives gradients of that dtype
while the tensors it saved are still float32, and a product of the two fails.
:func:`autocast_inputs` casts a Function's inputs as autocast would, before ``apply``: forward
and backward then see one dtype, and the casts, autograd nodes of their own, return the
gradients of float32 inputs in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["autocast_inputs"]


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors in the dtype autocast gives the inputs of a product, where autocast is on
    for the first tensor's device: floating tensors other than float64 cast to
    ``torch.get_autocast_dtype``; otherwise (and for None, integers, float64) unchanged.

    Example:
        >>> x, w = torch.ones(2, 3), torch.ones(4, 3)
        >>> [t.dtype for t in autocast_inputs(x, w)]
        [torch.float32, torch.float32]
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     [t.dtype for t in autocast_inputs(x, w, None)[:2]]
        [torch.bfloat16, torch.bfloat16]
    """
    first = next(t for t in tensors if t is not None)
    device = first.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )
