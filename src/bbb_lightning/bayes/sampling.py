"""Drawing from the posterior: multi-sample forward, deterministic networks, freezing.

Every one of the S samples of :func:`sample_forward` is an independent draw of every tensor.
Bayesian Linear/Conv layers draw S times within one forward call on the folded batch (one
weight draw per sample under weight reparameterization, one perturbation per sample under
flipout, fresh noise per row under local reparameterization). Tensors backed by a
parametrization (norm layers, embeddings, raw parameters, a bare root layer) are drawn once per
forward call, so a network that holds any runs S forward calls instead; so does a network with a
batch norm that normalises by the batch's statistics (in training mode, or without running
statistics), which would otherwise mix the S samples in its mean and variance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_map

from .arguments import is_integer
from .convert import remove_forward_pass_hooks, remove_recurrent_draw_hook
from .forward_pass import KLRecord, WeightReadInFold, forward_passes
from .kl import kl_divergence
from .layers import BayesianLayer
from .posteriors import VariationalPosterior

__all__ = [
    "freeze",
    "posterior_mean",
    "posterior_mean_network",
    "sample_forward",
    "sample_forward_with_kl",
    "sample_network",
    "unfreeze",
]


def sample_forward(net: nn.Module, x: Tensor, num_samples: int) -> Tensor:
    """Outputs for ``num_samples`` posterior draws in one vectorized forward: shape (S, B, ...).

    The S copies of the batch are folded into the batch dimension (S*B, ...), so the network
    runs once; no Python loop over samples. ``net`` must treat dimension 0 as the batch.

    Three kinds of network run S calls on the batch instead, their outputs stacked (any output
    structure then works: its tensors stacked, anything else, such as a Hugging Face
    ``DynamicCache``, kept as the last call's): one with a posterior behind a parametrization,
    drawn once per call; one that reads a Bayesian layer's ``weight`` itself (found on the
    first folded call, which is then abandoned); and one with a batch norm that normalises by
    the statistics of its batch (in training mode, or without running statistics), where every
    sample of the folded batch would be normalised by the mean and variance of all S together.

    A Bayesian layer that receives the folded copies themselves (the first layer, possibly after
    views such as ``nn.Flatten``) computes the part of its output that depends on the input
    alone once per example rather than once per sample (the mean and variance under local
    reparameterization, the mean under flipout); the noise is drawn for every sample.

    Example:
        >>> import torch
        >>> from bbb_lightning.bayes import bayesianize
        >>> net = bayesianize(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> sample_forward(net, torch.randn(5, 3), num_samples=4).shape
        torch.Size([4, 5, 2])
    """
    if not (is_integer(num_samples) and num_samples >= 1):
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    num_samples = int(num_samples)
    if num_samples == 1:
        out = net(x)
        if isinstance(out, Tensor):  # the common case, without tree_map's walk (every step)
            return out.unsqueeze(0)
        return tree_map(lambda output: _stack([output]), out)
    passes = forward_passes(net)
    if (
        _has_parametrized_posteriors(net)
        or _normalizes_by_batch_statistics(net)
        or any(forward_pass.reads_weights_in_fold for forward_pass in passes)
    ):
        return _sample_calls(net, x, num_samples)
    batch = x.shape[0]
    folded = x.unsqueeze(0).expand(num_samples, *x.shape).reshape(num_samples * batch, *x.shape[1:])
    try:
        with ExitStack() as stack:
            for forward_pass in passes:
                stack.enter_context(forward_pass.folded(num_samples, copies=folded))
            out = net(folded)
    except WeightReadInFold:  # the network reads a layer's weight itself: one call per sample
        for forward_pass in passes:
            forward_pass.reads_weights_in_fold = True
            if forward_pass.record is not None:
                forward_pass.record.clear()
        return _sample_calls(net, x, num_samples)

    def unfold(output: Any) -> Any:
        if not isinstance(output, Tensor):
            return output  # e.g. a cache object: the one folded call's, as it is
        if output.dim() == 0 or output.shape[0] != num_samples * batch:
            raise ValueError(
                f"sample_forward folds the {num_samples} samples into the batch dimension and "
                f"needs every output of the network batch-first, with {num_samples * batch} rows "
                f"for a batch of {batch}; got an output of shape {tuple(output.shape)} (for such "
                "a network, stack S calls: torch.stack([net(x) for _ in range(S)]))"
            )
        return output.reshape(num_samples, batch, *output.shape[1:])

    return tree_map(unfold, out)


def sample_forward_with_kl(
    net: nn.Module,
    x: Tensor,
    num_samples: int,
    reduction: str = "sum",
    monte_carlo: bool = False,
) -> tuple[Tensor, Tensor]:
    """(:func:`sample_forward`'s outputs, KL(q || p)) for one training step, the KL computed
    with the forward pass's own draws.

    The forward pass records (:class:`~bbb_lightning.bayes.forward_pass.KLRecord`) the weights
    it used and, where the fused fast path drew them, the closed-form KL it computed with them;
    :func:`~bbb_lightning.bayes.kl_divergence` then takes those KLs as they are and evaluates
    the Monte Carlo KL (Blundell et al. 2015, eq. 2) at those weights, averaged over the S
    samples. The same value as ``sample_forward`` then ``kl_divergence`` in expectation, with
    less work and, for a Monte Carlo KL, lower variance (the S draws rather than one fresh one).

    Example:
        >>> import torch
        >>> from bbb_lightning.bayes import bayesianize
        >>> net = bayesianize(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> out, kl = sample_forward_with_kl(net, torch.randn(5, 3), num_samples=4)
        >>> out.shape, kl.shape
        (torch.Size([4, 5, 2]), torch.Size([]))
    """
    record = KLRecord()
    with ExitStack() as stack:
        for forward_pass in forward_passes(net):
            stack.enter_context(forward_pass.recording(record))
        out = sample_forward(net, x, num_samples)
    return out, kl_divergence(net, reduction, monte_carlo, record=record)


def _sample_calls(net: nn.Module, x: Tensor, num_samples: int) -> Any:
    """S calls of ``net`` on the batch, their outputs stacked (:func:`_stack`)."""
    outputs = [net(x) for _ in range(num_samples)]
    return tree_map(lambda *samples: _stack(list(samples)), *outputs)


def _stack(samples: list[Any]) -> Any:
    """The S samples of one output leaf: tensors stacked into (S, ...); anything else (a
    Hugging Face ``DynamicCache``, a string, None) is not a sample of a distribution and is
    kept as the last sample's."""
    if all(isinstance(sample, Tensor) for sample in samples):
        return torch.stack(samples)
    return samples[-1]


def _has_parametrized_posteriors(net: nn.Module) -> bool:
    """Whether a posterior (not frozen) backs a parametrized tensor of ``net``: drawn once per
    forward call, it would be shared by S samples folded into one call."""
    return any(
        isinstance(posterior, VariationalPosterior) and not posterior.frozen
        for module in net.modules()
        if parametrize.is_parametrized(module)
        for parametrizations in module.parametrizations.values()
        for posterior in parametrizations
    )


def _normalizes_by_batch_statistics(net: nn.Module) -> bool:
    """Whether a batch norm of ``net`` normalises by its batch's mean and variance (training
    mode, or no running statistics): on S samples folded into one batch they would be the
    statistics of all S samples together, so the samples would not be independent."""
    return any(
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and (module.training or not module.track_running_stats)
        for module in net.modules()
    )


def _posteriors(net: nn.Module) -> Iterator[VariationalPosterior]:
    return (m for m in net.modules() if isinstance(m, VariationalPosterior))


def freeze(net: nn.Module) -> nn.Module:
    """Predict with the posterior mean, in place: every forward becomes deterministic."""
    for posterior in _posteriors(net):
        posterior.frozen = True
    return net


def unfreeze(net: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: forwards draw from the posterior again."""
    for posterior in _posteriors(net):
        posterior.frozen = False
    return net


@contextmanager
def posterior_mean(net: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``net`` predicts with the posterior mean; its state is restored after."""
    states = [(posterior, posterior.frozen) for posterior in _posteriors(net)]
    freeze(net)
    try:
        yield net
    finally:
        for posterior, frozen in states:
            posterior.frozen = frozen


def _materialize(net: nn.Module, use_mean: bool) -> nn.Module:
    """A deep copy of ``net`` turned into a plain module holding one set of weights.

    Its tensors are normal ones whatever the grad mode of the call: under
    ``torch.inference_mode`` they would be inference tensors, which autograd refuses (no input
    gradient, no training of the copy)."""
    with torch.inference_mode(False), torch.no_grad():
        plain = copy.deepcopy(net, _without_recurrent_draws(net))
        (freeze if use_mean else unfreeze)(plain)

        chosen: dict[int, nn.Parameter] = {}  # a tied tensor: one value, one parameter

        def value(posterior: VariationalPosterior) -> nn.Parameter:
            if id(posterior) not in chosen:
                tensor = posterior.mean.clone() if use_mean else posterior.rsample()
                chosen[id(posterior)] = nn.Parameter(tensor.detach())
            return chosen[id(posterior)]

        for module in list(plain.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, BayesianLayer):
                    weight = value(child.weight_posterior)
                    q_bias = child.bias_posterior
                    bias = child.bias if q_bias is None else value(q_bias)
                    setattr(module, child_name, child.to_plain(weight, bias))
        for module in list(plain.modules()):
            if parametrize.is_parametrized(module):
                _remove_posterior_parametrizations(module, value)
        remove_forward_pass_hooks(plain)
        for module in plain.modules():
            if isinstance(module, nn.RNNBase):
                remove_recurrent_draw_hook(module)
                module._init_flat_weights()  # its plain parameters, in place of the left-out draws
        return plain


def _without_recurrent_draws(net: nn.Module) -> dict[int, None]:
    """A ``copy.deepcopy`` memo that leaves out the weights an ``nn.RNNBase`` keeps from its
    last forward (``_flat_weights``): with a parametrized weight they are draws, part of an
    autograd graph, which cannot be deep-copied."""
    return {
        id(weight): None
        for module in net.modules()
        if isinstance(module, nn.RNNBase)
        for weight in module._flat_weights
        if isinstance(weight, Tensor) and not weight.is_leaf
    }


def _remove_posterior_parametrizations(
    module: nn.Module, value: Callable[[VariationalPosterior], Tensor]
) -> None:
    """Replace every tensor of ``module`` that a posterior parametrizes by a plain parameter
    holding ``value`` (through any parametrization registered after the posterior); the
    network's own parametrizations (``weight_norm``, ``orthogonal``, ...) stay.

    ``parametrize.remove_parametrizations`` would delete the property from the injected
    ``Parametrized<Class>``, which a deep copy shares with the original network; so we restore
    the original class on the copy instead (or, while parametrizations of its own remain, give
    the copy a class of its own without the removed properties) and leave the shared class alone.
    """
    parametrizations = module.parametrizations
    values = {}
    for name, plist in list(parametrizations.items()):
        if isinstance(plist[0], VariationalPosterior):
            tensor = value(plist[0])
            with torch.no_grad():
                for index in range(1, len(plist)):
                    tensor = plist[index](tensor)
            values[name] = tensor
            del parametrizations[name]
    if not values:
        return
    cls = module.__class__
    if len(parametrizations):
        kept = {key: item for key, item in vars(cls).items() if key not in values}
        module.__class__ = type(cls.__name__, cls.__bases__, kept)
    else:
        del module.parametrizations
        module.__class__ = cls.__bases__[0]
    for name, tensor in values.items():
        parameter = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor)
        module.register_parameter(name, parameter)


def sample_network(net: nn.Module) -> nn.Module:
    """One posterior draw as a plain deterministic ``nn.Module`` (a deep copy).

    The copy holds no posterior, no parametrization of one (the network's own, such as
    ``weight_norm``, stay) and no randomness: two calls on the same input give the same
    output, and autograd on the input works as in any network (e.g. the input gradient
    d loss / d x under one posterior draw).
    """
    return _materialize(net, use_mean=False)


def posterior_mean_network(net: nn.Module) -> nn.Module:
    """The network at the posterior mean, as a plain deterministic ``nn.Module`` (a deep copy)."""
    return _materialize(net, use_mean=True)
