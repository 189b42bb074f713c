"""``bayesianize``: give every parameter of any ``nn.Module`` a variational posterior."""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from types import FunctionType

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .forward_pass import ForwardPass, close_forward_pass, open_forward_pass
from .layers import BAYESIAN_LAYERS, BayesianLayer, check_estimator
from .posteriors import MeanFieldNormal, VariationalPosterior, named_posteriors
from .priors import GaussianPrior, Prior

__all__ = ["bayesianize", "is_bayesian"]


def is_bayesian(net: nn.Module) -> bool:
    """Whether ``net`` holds at least one variational tensor."""
    return next(named_posteriors(net), None) is not None


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include is not None and not any(fnmatchcase(name, pattern) for pattern in include):
        return False
    return not (exclude and any(fnmatchcase(name, pattern) for pattern in exclude))


def _check_untied(
    net: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> None:
    """No variational parameter is tied to another (one tensor under two names, or one module
    under two names): each name would get a posterior of its own, untying them silently. A
    tied tensor all of whose names are left out stays deterministic and shared."""
    names: dict[int, list[str]] = {}
    for name, parameter in net.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for tied in names.values():
        if len(tied) > 1 and any(_selected(name, include, exclude) for name in tied):
            raise ValueError(
                f"parameters {', '.join(map(repr, tied))} are tied (one tensor); bayesianize "
                "cannot give a shared tensor one posterior: untie them or exclude all of them"
            )


def _check_patterns(
    net: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> None:
    """Every include/exclude pattern matches a parameter name, and some parameter is left
    variational: a typo in a pattern would otherwise change the model silently."""
    names = [name for name, _ in net.named_parameters(remove_duplicate=False)]
    listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    for key, patterns in (("include", include), ("exclude", exclude)):
        if isinstance(patterns, str):
            raise ValueError(f"{key} must be a list of glob patterns, got the string {patterns!r}")
        for pattern in patterns or ():
            if not any(fnmatchcase(name, pattern) for name in names):
                raise ValueError(
                    f"{key} pattern {pattern!r} matches none of the parameters: {listed}"
                )
    if not any(_selected(name, include, exclude) for name in names):
        raise ValueError(
            "no parameter to make variational: the network has none"
            if not names
            else f"include={include!r} and exclude={exclude!r} leave no parameter variational"
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ``<anything>.<child>.weight`` / ``.bias``: a module that reads a child's tensors itself, as
# ``nn.TransformerEncoderLayer.forward`` does (``self.linear1.weight``, for its fast path) and
# ``nn.TransformerEncoder.forward`` through a local (``first_layer.linear1.weight``).
_TENSOR_READ = re.compile(r"\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*\.\s*(?:weight|bias)\b")
_tensor_reads: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def _construction_only(method_name: str) -> bool:
    """Methods that run before ``bayesianize`` (building, initialising, unpickling, printing),
    where ``nn.init.normal_(self.fc.weight)`` and the like are no reason to keep a layer."""
    lowered = method_name.lower()
    return method_name in ("__setstate__", "extra_repr") or "init" in lowered or "reset" in lowered


def _children_whose_tensors_are_read(cls: type) -> frozenset[str]:
    """The names ``n`` such that a method of ``cls`` (or of a class it inherits from, short of
    ``nn.Module``) reads ``<...>.n.weight`` or ``<...>.n.bias``, from the methods' source. A
    class without source (built in, made at run time) reads none that we can see."""
    names = _tensor_reads.get(cls)
    if names is None:
        found: set[str] = set()
        for base in cls.__mro__:
            if base in (nn.Module, object):
                continue
            for method_name, method in vars(base).items():
                if not isinstance(method, FunctionType) or _construction_only(method_name):
                    continue
                try:
                    found.update(_TENSOR_READ.findall(inspect.getsource(method)))
                except (OSError, TypeError):
                    continue
        names = _tensor_reads[cls] = frozenset(found)
    return names


def _tensors_read_directly(net: nn.Module, prefix: str, child_name: str) -> bool:
    """Whether the module at ``prefix`` or one of the modules above it reads the ``weight`` or
    ``bias`` of its child ``child_name`` itself (rather than only calling it): that child must
    keep its class and attributes, so it gets parametrized tensors instead of becoming a
    Bayesian layer (which has no ``weight``, and a ``bias`` of ``None`` when it is variational).
    Reading too much here costs speed, never correctness."""
    parts = prefix.split(".") if prefix else []
    above = (net.get_submodule(".".join(parts[:depth])) for depth in range(len(parts) + 1))
    return any(child_name in _children_whose_tensors_are_read(type(m)) for m in above)


def bayesianize(
    net: nn.Module,
    prior: Prior | None = None,
    posterior: Callable[..., VariationalPosterior] = MeanFieldNormal,
    estimator: str = "reparameterization",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> nn.Module:
    """Make the parameters of ``net`` variational, in place, and return ``net``.

    Every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` child (exact type) becomes a
    :class:`~bbb_lightning.bayes.layers.BayesianLayer` with the chosen ``estimator``, unless
    its parent or a module above reads its ``weight`` or ``bias`` outside construction (as
    ``nn.TransformerEncoderLayer`` reads ``self.linear1.weight``, seen in the methods' source);
    every other parameter (such kept layers, norm layers, embeddings, raw ``nn.Parameter``
    attributes, a bare root layer) is backed by a posterior through ``torch.nn.utils.parametrize``
    and drawn by weight reparameterization once per forward pass of ``net``
    (``parametrize.cached``). The current values become the posterior means, so a pretrained
    network starts where it was.

    Args:
        net: any module.
        prior: p(w) for every tensor (default N(0, 1)); ``prior.for_parameter`` may specialise it.
        posterior: builds q for one tensor, called as ``posterior(initial_value, prior=...)``:
            a :class:`VariationalPosterior` class or a ``functools.partial`` of one.
        estimator: ``"reparameterization"``, ``"local"`` or ``"flipout"`` for Linear/Conv layers.
        include: glob patterns on parameter names (``"fc.*"``, ``"*.weight"``); default all.
        exclude: glob patterns of parameters that stay deterministic.

    Trainable tensors are named ``<layer>.weight_posterior.mu`` / ``.rho`` in Bayesian layers
    and ``<module>.parametrizations.<name>.0.mu`` / ``.rho`` elsewhere;
    :func:`~bbb_lightning.bayes.named_posteriors` lists them under their original names.

    Example:
        >>> net = bayesianize(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))
        >>> [name for name, _ in named_posteriors(net)]
        ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight', '2.bias']
    """
    check_estimator(estimator)
    if prior is not None and not isinstance(prior, Prior):
        raise TypeError(f"prior must be a Prior (e.g. GaussianPrior()), got {prior!r}")
    if not callable(posterior):
        raise TypeError(
            f"posterior must be a callable building q for one tensor (e.g. MeanFieldNormal or "
            f"functools.partial(MeanFieldNormal, rho_init=-6)), got {posterior!r}"
        )
    if is_bayesian(net):
        raise ValueError("the network is already Bayesian; bayesianize it only once")
    _check_patterns(net, include, exclude)
    _check_untied(net, include, exclude)
    prior = GaussianPrior(0.0, 1.0) if prior is None else prior

    def make_posterior(value: Tensor) -> VariationalPosterior:
        return posterior(value, prior=prior.for_parameter(value))

    def selected(name: str) -> bool:
        return _selected(name, include, exclude)

    for prefix, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            layer_type = BAYESIAN_LAYERS.get(type(child))
            path = _join(prefix, child_name)
            if (
                layer_type is not None
                and selected(_join(path, "weight"))
                and not _tensors_read_directly(net, prefix, child_name)
            ):
                bias_selected = child.bias is not None and selected(_join(path, "bias"))
                layer = layer_type.__new__(layer_type)
                BayesianLayer.__init__(layer, child, make_posterior, estimator, bias_selected)
                setattr(module, child_name, layer)

    for prefix, module in list(net.named_modules()):
        if isinstance(module, BayesianLayer | VariationalPosterior | Prior):
            continue
        for name, value in list(module.named_parameters(recurse=False)):
            if selected(_join(prefix, name)):
                parametrize.register_parametrization(module, name, make_posterior(value))
    _share_forward_pass(net)
    net.register_forward_pre_hook(open_forward_pass)
    net.register_forward_hook(close_forward_pass, always_call=True)
    return net


def _share_forward_pass(net: nn.Module) -> None:
    """One :class:`~bbb_lightning.bayes.forward_pass.ForwardPass` for the root and every
    Bayesian layer and posterior of ``net``; the root's hooks open and close it."""
    forward_pass = ForwardPass()
    for module in net.modules():
        if isinstance(module, BayesianLayer | VariationalPosterior):
            module.forward_pass = forward_pass
    net.bayes_forward_pass = forward_pass


def remove_forward_pass_hooks(net: nn.Module) -> None:
    """Remove the root hooks :func:`bayesianize` installed (the forward pass of the layers and
    its parametrization cache), when the network becomes plain again."""
    net.__dict__.pop("bayes_forward_pass", None)
    for hooks, hook in (
        (net._forward_pre_hooks, open_forward_pass),
        (net._forward_hooks, close_forward_pass),
    ):
        for key in [key for key, value in hooks.items() if value is hook]:
            del hooks[key]
            net._forward_hooks_always_called.pop(key, None)
