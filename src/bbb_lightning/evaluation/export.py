"""Export deterministic networks drawn from a posterior, for deployment without this package.

Each exported network is a plain ``nn.Module`` (no posterior, no parametrization of one, no
randomness), written twice:

- ``<name>.pt``: its ``state_dict()``, loadable into the original architecture
  (e.g. ``bbb_lightning.models.nets.MLP(...)`` or your own class) with ``load_state_dict``;
- ``<name>.torchscript.pt``: a traced TorchScript module, loadable with ``torch.jit.load``
  alone, with no Python class and no import of this package.

``torch.jit.trace`` records the operations run on an example input, so networks whose control
flow depends on the data are not captured faithfully; the MLP and CNN of
:mod:`bbb_lightning.models.nets` are fine at any batch size. (Recent torch versions deprecate
TorchScript in favour of ``torch.export``; it still loads everywhere ``torch`` is installed.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..bayes import posterior_mean_network, sample_network
from .pruning import prune_by_snr

__all__ = ["export_module", "export_posterior"]


def export_module(module: nn.Module, directory: str | Path, name: str, example: Tensor) -> dict:
    """Write ``module``'s state dict and its TorchScript trace on ``example``; return the paths.

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     paths = export_module(net, folder, "net", torch.zeros(1, 3))
        ...     loaded = torch.jit.load(paths["torchscript"])
        ...     bool(torch.equal(loaded(torch.ones(4, 3)), net(torch.ones(4, 3))))
        True
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    state_path = directory / f"{name}.pt"
    script_path = directory / f"{name}.torchscript.pt"
    torch.save(module.state_dict(), state_path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, example.detach())
        torch.jit.save(traced, str(script_path))
    return {"state_dict": str(state_path), "torchscript": str(script_path)}


def export_posterior(
    net: nn.Module,
    directory: str | Path,
    example: Tensor,
    pruned_fraction: float | None = None,
) -> dict[str, dict]:
    """Export the posterior-mean network, one posterior draw and (optionally) a pruned mean.

    Files in ``directory``: ``posterior_mean.*``, ``posterior_draw.*`` and, with
    ``pruned_fraction`` p, ``pruned_<100 p>.*``
    (:func:`~bbb_lightning.evaluation.pruning.prune_by_snr`).
    Returns ``{name: {"state_dict": path, "torchscript": path}}``.
    """
    modules = {
        "posterior_mean": posterior_mean_network(net),
        "posterior_draw": sample_network(net),
    }
    if pruned_fraction is not None:
        modules[f"pruned_{round(100 * pruned_fraction):d}"] = prune_by_snr(net, pruned_fraction)
    return {name: export_module(m, directory, name, example) for name, m in modules.items()}
