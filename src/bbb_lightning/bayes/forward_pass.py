"""What one forward pass of a Bayesian network shares between its layers, held by the network.

A layer's ``forward(x)`` has no room for more arguments, yet it needs to know three things
about the call it is part of. They travel in one :class:`ForwardPass` object that
:func:`~bbb_lightning.bayes.bayesianize` gives the network and every Bayesian layer and
posterior in it (``module.forward_pass``; the root also answers ``net.bayes_forward_pass``),
set only by the functions that make the call, and only for its duration:

- ``num_samples`` (and the folded input): :func:`~bbb_lightning.bayes.sample_forward` folds S
  posterior samples into the batch dimension as (S*B, ...), and says so here;
- ``draws``: under weight reparameterization a layer applied twice in one forward pass of the
  root (a Siamese branch, a cell unrolled over time) applies the same weights twice. The root's
  hooks open and close that pass (:func:`open_forward_pass`, :func:`close_forward_pass`), which
  also holds ``torch.nn.utils.parametrize.cached()`` so that every read of a parametrized tensor
  in it sees one draw;
- ``record``: a :class:`KLRecord` into which the pass writes what the KL of the same step
  needs: the closed-form KLs the fused fast path computed with its draws, and the draws
  themselves for a Monte Carlo KL (:func:`~bbb_lightning.bayes.sample_forward_with_kl`).

Nothing here is global: two networks, or two threads on two networks, never see each other's
state, and a deep copy of a network has a forward pass of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from .posteriors import VariationalPosterior

__all__ = [
    "ForwardPass",
    "KLRecord",
    "WeightReadInFold",
    "close_forward_pass",
    "forward_passes",
    "open_forward_pass",
]


class WeightReadInFold(RuntimeError):
    """A Bayesian layer's ``weight`` was read while S samples were folded into one call: no
    single weight stands for S samples. :func:`~bbb_lightning.bayes.sample_forward` then runs
    the S samples one call each, for this network from then on."""


class KLRecord:
    """What a forward pass leaves for the KL of the same step, per posterior.

    ``kls[q]``: KL(q || p) summed over the tensor, computed with the draw by the fused node of
    the fast path (a closed form; the same value as the registered one). ``samples[q]``: the
    weights w_s the pass used, each of shape ``sample_shape + mean.shape`` (flipout's are kept
    as the perturbation w_s - mu and completed on demand), for the Monte Carlo KL
    KL ~= -H(q) - (1/S) sum_s log p(w_s) (Blundell et al. 2015, eq. 2).
    """

    def __init__(self) -> None:
        self.kls: dict[VariationalPosterior, Tensor] = {}
        self._draws: dict[VariationalPosterior, list[tuple[Tensor, bool]]] = {}

    def clear(self) -> None:
        """Forget everything recorded (a forward pass that was abandoned and run again)."""
        self.kls.clear()
        self._draws.clear()

    def add_kl(self, posterior: VariationalPosterior, kl: Tensor) -> None:
        self.kls[posterior] = kl

    def add_sample(self, posterior: VariationalPosterior, sample: Tensor) -> None:
        self._draws.setdefault(posterior, []).append((sample, False))

    def add_perturbation(self, posterior: VariationalPosterior, perturbation: Tensor) -> None:
        """A draw w_s = mean + ``perturbation``, completed only if a Monte Carlo KL asks."""
        self._draws.setdefault(posterior, []).append((perturbation, True))

    def sample(self, posterior: VariationalPosterior) -> Tensor | None:
        """Every draw of ``posterior`` in the pass, as (count, *mean.shape); None if none."""
        draws = self._draws.get(posterior)
        if not draws:
            return None
        mean = posterior.mean
        rows = [
            (mean + value if perturbation else value).reshape(-1, *mean.shape)
            for value, perturbation in draws
        ]
        return rows[0] if len(rows) == 1 else torch.cat(rows)


class ForwardPass:
    """The state one forward call of a Bayesian network shares between its layers (see the
    module docstring). Plain attributes, read by the layers on every call."""

    def __init__(self) -> None:
        self.num_samples = 1
        self.copies: Tensor | None = None  # the folded input: S copies of ``source``
        self.source: Tensor | None = None
        self.record: KLRecord | None = None
        self.reads_weights_in_fold = False  # a layer's weight is read in the forward pass
        self._draws: list[dict[Any, Any]] = []
        self._caches: list[Any] = []

    @property
    def draws(self) -> dict[Any, Any] | None:
        """The draws of the innermost open pass of the root, None outside one."""
        return self._draws[-1] if self._draws else None

    def open(self) -> None:
        self._draws.append({})
        cache = parametrize.cached()
        cache.__enter__()
        self._caches.append(cache)

    def close(self) -> None:
        self._draws.pop()
        self._caches.pop().__exit__(None, None, None)

    @contextmanager
    def folded(
        self, num_samples: int, copies: Tensor | None = None, source: Tensor | None = None
    ) -> Iterator[None]:
        """Within the block, a batch holds ``num_samples`` samples folded as (S*B, ...);
        ``copies``, if given, is the folded input: S copies of the batch ``source``."""
        saved = (self.num_samples, self.copies, self.source)
        self.num_samples, self.copies, self.source = num_samples, copies, source
        try:
            yield
        finally:
            self.num_samples, self.copies, self.source = saved

    @contextmanager
    def recording(self, record: KLRecord | None) -> Iterator[None]:
        """Within the block, the layers and posteriors write into ``record``."""
        saved, self.record = self.record, record
        try:
            yield
        finally:
            self.record = saved

    def __getstate__(self) -> dict[str, Any]:
        # A copy or a pickle of the network starts outside any call (no tensors of one pass).
        return ForwardPass().__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(ForwardPass().__dict__)


def forward_passes(net: nn.Module) -> list[ForwardPass]:
    """The distinct forward passes of the Bayesian layers and posteriors in ``net`` (one for a
    network bayesianized once; several for a module composed of several)."""
    found: dict[int, ForwardPass] = {}
    for module in net.modules():
        forward_pass = module.__dict__.get("forward_pass")
        if isinstance(forward_pass, ForwardPass):
            found.setdefault(id(forward_pass), forward_pass)
    return list(found.values())


def open_forward_pass(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a bayesianized root: a new forward pass begins."""
    module.bayes_forward_pass.open()


def close_forward_pass(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (always called) of a bayesianized root: the forward pass ends."""
    module.bayes_forward_pass.close()
