"""``bayesianize``: give every parameter of any ``nn.Module`` a variational posterior."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from functools import partial

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


def _tied_tensors(
    net: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> set[int]:
    """The ids of the variational tensors that ``net`` holds under several names (weights tied
    as GPT-2 ties its embedding and output layer, or one module used in two places). Each gets
    one posterior, shared by every name, so its KL counts once and one forward pass draws it
    once. The names of one tensor are selected all or none: selecting some would untie it."""
    names: dict[int, list[str]] = {}
    owners: dict[int, set[int]] = {}
    for prefix, module in net.named_modules(remove_duplicate=False):
        for name, parameter in module.named_parameters(recurse=False):
            names.setdefault(id(parameter), []).append(_join(prefix, name))
            owners.setdefault(id(parameter), set()).add(id(module))
    tied = set()
    for key, group in names.items():
        if len(group) < 2:
            continue
        chosen = [_selected(name, include, exclude) for name in group]
        if any(chosen) and not all(chosen):
            raise ValueError(
                f"parameters {', '.join(map(repr, group))} are tied (one tensor) but include/"
                "exclude select only some of their names: select all of them (one shared "
                "posterior) or exclude all of them (deterministic and shared)"
            )
        if all(chosen) and len(owners[key]) > 1:  # (one module in two places: one layer)
            tied.add(key)
    return tied


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


def _keeps_its_class(module: nn.Module) -> bool:
    """Whether a Linear/Conv module must keep its class (its tensors parametrized) rather than
    be swapped for a Bayesian layer: it carries hooks of its own, which a new layer would
    drop. Torch's hook-based ``nn.utils.weight_norm``, ``spectral_norm`` and ``prune`` are such
    hooks: they compute ``weight`` from ``weight_g``/``weight_v`` (``weight_orig``, a mask)
    before every call, so those tensors are the ones made variational."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_pre_hooks
        or module._backward_hooks
        or module._state_dict_hooks
        or module._load_state_dict_pre_hooks
    )


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
    :class:`~bbb_lightning.bayes.layers.BayesianLayer` with the chosen ``estimator``, unless it
    carries hooks (the old hook-based ``nn.utils.weight_norm``, ``spectral_norm``, ``prune``,
    a user's) or a tied tensor; a Bayesian layer still answers ``.weight`` and ``.bias`` (the
    draw of the forward pass), so a parent that reads them (``nn.TransformerEncoderLayer``'s
    fast path) keeps working. Every other parameter (such kept layers, norm layers, embeddings,
    raw ``nn.Parameter`` attributes, a bare root layer) is backed by a posterior through
    ``torch.nn.utils.parametrize``
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
    tied = _tied_tensors(net, include, exclude)
    prior = GaussianPrior(0.0, 1.0) if prior is None else prior

    def make_posterior(value: Tensor) -> VariationalPosterior:
        return posterior(value, prior=prior.for_parameter(value))

    def selected(name: str) -> bool:
        return _selected(name, include, exclude)

    layers: dict[int, BayesianLayer] = {}  # one module in two places stays one layer
    for prefix, module in list(net.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):  # every name, tied or not
            if child is None:
                continue
            if id(child) in layers:
                setattr(module, child_name, layers[id(child)])
                continue
            layer_type = BAYESIAN_LAYERS.get(type(child))
            path = _join(prefix, child_name)
            if (
                layer_type is not None
                and selected(_join(path, "weight"))
                and not _keeps_its_class(child)
                and not any(id(p) in tied for p in child.parameters(recurse=False))
            ):
                bias_selected = child.bias is not None and selected(_join(path, "bias"))
                layer = layer_type.__new__(layer_type)
                BayesianLayer.__init__(layer, child, make_posterior, estimator, bias_selected)
                setattr(module, child_name, layer)
                layers[id(child)] = layer

    shared: dict[int, tuple[Tensor, VariationalPosterior]] = {}  # a tied tensor's one posterior
    for prefix, module in list(net.named_modules()):
        if isinstance(module, BayesianLayer | VariationalPosterior | Prior):
            continue
        for name, value in list(module.named_parameters(recurse=False)):
            if selected(_join(prefix, name)):
                if id(value) not in shared:
                    shared[id(value)] = (value, make_posterior(value))
                parametrize.register_parametrization(module, name, shared[id(value)][1])
    _guard_embedding_methods(net)
    for module in net.modules():
        if isinstance(module, nn.RNNBase) and parametrize.is_parametrized(module):
            module.register_forward_hook(_detach_recurrent_draws, always_call=True)
    _share_forward_pass(net)
    net.register_forward_pre_hook(open_forward_pass)
    net.register_forward_hook(close_forward_pass, always_call=True)
    return net


def _weight_posterior(module: nn.Module | None) -> VariationalPosterior | None:
    """The posterior behind ``module.weight`` (a Bayesian layer's or a parametrization's)."""
    if isinstance(module, BayesianLayer):
        return module.weight_posterior
    if module is not None and parametrize.is_parametrized(module, "weight"):
        first = module.parametrizations["weight"][0]
        return first if isinstance(first, VariationalPosterior) else None
    return None


def _guard_embedding_methods(net: nn.Module) -> None:
    """Hugging Face's ``resize_token_embeddings`` and ``tie_weights`` (a ``PreTrainedModel``'s)
    work on plain embedding tensors. After ``bayesianize`` the network's own methods are
    replaced by ones that do what still makes sense: ``tie_weights`` finds the embeddings
    already tied (one shared posterior) or calls the original where they are deterministic;
    ``resize_token_embeddings`` calls the original where the embedding is deterministic. Where
    either would have to rebuild a variational tensor they stop with one line saying to call
    them before ``bayesianize``."""
    for name, guard in (
        ("tie_weights", _tie_weights_after_bayesianize),
        ("resize_token_embeddings", _resize_token_embeddings_after_bayesianize),
    ):
        original = getattr(type(net), name, None)
        if callable(original) and callable(getattr(net, "get_input_embeddings", None)):
            object.__setattr__(net, name, partial(guard, net, original))


def _tie_weights_after_bayesianize(
    net: nn.Module, original: Callable[..., object], *args: object, **kwargs: object
) -> object:
    get_output = getattr(net, "get_output_embeddings", None)
    input_q = _weight_posterior(net.get_input_embeddings())
    output_q = _weight_posterior(get_output() if callable(get_output) else None)
    if input_q is None and output_q is None:
        return original(net, *args, **kwargs)  # deterministic embeddings: as before
    if input_q is output_q:
        return None  # tied by bayesianize already: one posterior for both
    raise ValueError(
        "tie_weights() after bayesianize would replace a variational embedding; call "
        "model.tie_weights() before bayesianize(model), which then gives the tied tensors "
        "one posterior"
    )


def _resize_token_embeddings_after_bayesianize(
    net: nn.Module, original: Callable[..., object], *args: object, **kwargs: object
) -> object:
    if _weight_posterior(net.get_input_embeddings()) is None:
        return original(net, *args, **kwargs)  # a deterministic embedding: as before
    raise ValueError(
        "resize_token_embeddings() after bayesianize would replace the variational embedding "
        "by a plain one; call model.resize_token_embeddings(n) before bayesianize(model)"
    )


def _detach_recurrent_draws(module: nn.RNNBase, args: object, output: object) -> None:
    """Forward hook of a parametrized ``nn.RNNBase``: the weights it keeps from the call
    (``_flat_weights``) are draws, part of the step's autograd graph, which ``copy.deepcopy``
    refuses; it keeps them detached (the graph keeps its own references) and marks them
    stale, so that the next call reads its weights anew."""
    module._flat_weights = [
        weight.detach() if isinstance(weight, Tensor) else weight for weight in module._flat_weights
    ]
    # ``_weights_have_changed`` then always answers yes: the next call reads its weights anew.
    module._flat_weight_refs = [
        None if ref is None else _no_tensor for ref in module._flat_weight_refs
    ]


def _no_tensor() -> None:
    """Stands for a dead weak reference: it refers to no tensor."""
    return None


def remove_recurrent_draw_hook(module: nn.RNNBase) -> None:
    """Remove :func:`_detach_recurrent_draws` from ``module`` (become plain again)."""
    for key in [
        key for key, hook in module._forward_hooks.items() if hook is _detach_recurrent_draws
    ]:
        del module._forward_hooks[key]
        module._forward_hooks_always_called.pop(key, None)


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
