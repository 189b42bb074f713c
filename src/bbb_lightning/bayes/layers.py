"""Bayesian Linear and Conv{1,2,3}d layers with three gradient estimators.

For an affine map a = W x + b with a factorised Gaussian q(W) = N(mu, sigma^2):

- ``"reparameterization"``: one draw W = mu + sigma * eps, eps ~ N(0, I), per forward pass,
  shared by the whole minibatch (Blundell et al. 2015).
- ``"local"``: local reparameterization (Kingma et al. 2015). The pre-activations of each
  example are drawn directly from their exact marginal,
  a ~ N(mu x + mu_b, sigma^2 x^2 + sigma_b^2) (squares elementwise), so every example gets
  independent noise and the gradient variance drops. No weight is ever drawn.
- ``"flipout"`` (Wen et al. 2018): one shared perturbation dW = sigma * eps, decorrelated
  across examples by random signs, a_n = mu x_n + ((x_n * s_n) dW^T) * r_n with s_n, r_n
  uniform in {-1, +1} per input and output channel. Each example sees the valid weight draw
  mu + dW * r_n s_n^T.

All three give each pre-activation the same mean and variance; they differ in how the noise
is correlated across examples, hence in gradient variance and cost.

Several posterior samples in one call (:func:`~bbb_lightning.bayes.sample_forward`) are
folded into the batch dimension: under ``"local"`` every row already gets independent noise;
under ``"reparameterization"`` the layer draws one weight per sample, and under ``"flipout"``
one perturbation dW per sample (a shared dW would leave the S copies of an example differing
only by random signs), and runs one batched matmul (``torch.baddbmm``) or grouped convolution.
A layer that receives the S copies themselves (the first layer) computes what depends on its
input alone once per example: the mean and variance under ``"local"``, the mean under
``"flipout"`` (the layer's :class:`~bbb_lightning.bayes.forward_pass.ForwardPass` says S and
which tensor the copies are). In inference mode, ``"local"`` and ``"flipout"`` layers
draw from the same per-example distribution by the cheapest exact way instead
(:meth:`BayesianLayer._predictive_sample`).

The per-weight work of the Gaussian posterior (sigma = softplus(rho), the draw, sigma^2, and
their gradients) is the posterior's (:mod:`bbb_lightning.bayes.functional` in plain torch ops;
where the native kernels serve, :mod:`bbb_lightning.bayes.gaussian_ops`: sigma once per
forward, one autograd node per use); local reparameterization's draw of the pre-activations, and its
gradient, in :mod:`bbb_lightning.bayes.local_reparameterization`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from . import native
from .forward_pass import ForwardPass, WeightReadInFold
from .gaussian_ops import DRAW, PERTURBATION, VARIANCE, ScaleValues
from .local_reparameterization import linear_moments, sample_preactivations
from .mixed_precision import autocast_inputs
from .posteriors import (
    MeanFieldNormal,
    VariationalPosterior,
    draws_as_mean_field_normal,
    joint_uses,
)
from .priors import Prior

__all__ = [
    "ESTIMATORS",
    "BayesianConv1d",
    "BayesianConv2d",
    "BayesianConv3d",
    "BayesianLayer",
    "BayesianLinear",
]

ESTIMATORS = ("reparameterization", "local", "flipout")

# Without gradients, S per-sample weight draws (weight reparameterization, flipout) are made at
# most this many weights at a time (4 MiB in float32): memory does not grow with S, and each
# chunk is multiplied while it is still in cache (docs/performance.md, "Constants set by
# measurement").
_MAX_DRAWN_WEIGHTS = 1 << 20

# In inference mode, local reparameterization and flipout draw one weight per sample once a
# sample has this many output positions (rows x spatial positions): one product and in x out
# normals then cost less than local reparameterization's two products (the break-even points
# measured: docs/performance.md, "Constants set by measurement").
_MIN_POSITIONS_FOR_WEIGHT_DRAWS = 64


def _distinct_rows(forward_pass: ForwardPass, x: Tensor) -> int | None:
    """B if ``x`` is S copies of one batch of B rows; None if not known.

    Looked at only where ``x`` is the folded input of ``sample_forward`` or a view of it with
    the same layout (same memory, shape[0], element count and dtype, contiguous), and only on
    the eager path (:func:`~bbb_lightning.bayes.native.active`: the comparison depends on the
    data, which a compiled graph cannot); then the S blocks are compared, so that an in-place
    change that made them differ (an in-place dropout) is seen.
    """
    copies, num_samples = forward_pass.copies, forward_pass.num_samples
    if copies is None or num_samples == 1 or not len(x) or not native.active():
        return None  # (an empty batch has no row to compute once)
    same_layout = (
        x.data_ptr() == copies.data_ptr()
        and x.dtype == copies.dtype
        and x.shape[0] == copies.shape[0]
        and x.numel() == copies.numel()
        and x.is_contiguous()
    )
    if not same_layout:
        return None
    blocks = x.detach().reshape(num_samples, -1)
    return x.shape[0] // num_samples if bool((blocks == blocks[:1]).all()) else None


def _has_call_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks besides its ``forward`` (its own or global ones,
    as ``nn.Module.__call__`` checks), e.g. ``torch.nn.utils.prune``'s pre-hook that recomputes
    a pruned tensor."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_pre_hooks
        or module._backward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_backward_pre_hooks
        or _module_hooks._global_backward_hooks
    )


def check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    return estimator


def _random_signs(reference: Tensor, channel_dim: int) -> Tensor:
    """Rademacher signs, one per example and channel, broadcast over all other dimensions
    (:func:`~bbb_lightning.bayes.native.random_signs`)."""
    shape = [1] * reference.dim()
    shape[0] = reference.shape[0]
    shape[channel_dim] = reference.shape[channel_dim]
    return native.random_signs(tuple(shape), like=reference)


PosteriorBuilder = Callable[[Tensor], VariationalPosterior]


class BayesianLayer(nn.Module):
    """Shared machinery of the Bayesian affine layers.

    Holds ``weight_posterior`` and either ``bias_posterior`` (variational bias) or a plain
    ``bias`` parameter (deterministic, or ``None``). Subclasses say how to apply the affine map.
    """

    PLAIN: ClassVar[type[nn.Module]]
    CHANNEL_DIM: ClassVar[int]

    def __init__(
        self,
        plain: nn.Module,
        make_posterior: PosteriorBuilder,
        estimator: str,
        variational_bias: bool = True,
    ) -> None:
        super().__init__()
        self.estimator = check_estimator(estimator)
        self.forward_pass = ForwardPass()
        self.plain_config = self._config_of(plain)
        self.weight_posterior = make_posterior(plain.weight)
        plain_bias = plain.bias
        self._parameters["bias"] = None  # ``bias`` is a property: ``register_parameter`` checks
        if plain_bias is not None and variational_bias:
            self.bias_posterior: VariationalPosterior | None = make_posterior(plain_bias)
        else:
            self.bias_posterior = None
            if plain_bias is not None:
                self.register_parameter("bias", nn.Parameter(plain_bias.detach().clone()))
        for q in (self.weight_posterior, self.bias_posterior):
            if q is not None:
                q.forward_pass = self.forward_pass
        if estimator != "reparameterization":
            for q in (self.weight_posterior, self.bias_posterior):
                if q is not None and not isinstance(q, MeanFieldNormal):
                    raise TypeError(
                        f"estimator {estimator!r} needs a Gaussian (MeanFieldNormal) posterior, "
                        f"got {type(q).__name__}; use estimator='reparameterization'"
                    )

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        prior: Prior,
        posterior: Callable[..., VariationalPosterior] = MeanFieldNormal,
        estimator: str = "reparameterization",
        variational_bias: bool = True,
    ) -> BayesianLayer:
        """The Bayesian counterpart of ``module``; its weights become the posterior means."""
        if type(module) is not cls.PLAIN:
            raise TypeError(
                f"{cls.__name__}.from_module needs an nn.{cls.PLAIN.__name__}, got "
                f"{type(module).__name__}; bayesianize(net) picks the layer for each module"
            )
        layer = cls.__new__(cls)
        BayesianLayer.__init__(
            layer,
            module,
            lambda value: posterior(value, prior=prior.for_parameter(value)),
            estimator,
            variational_bias,
        )
        return layer

    # -- what subclasses define -------------------------------------------------------------
    @staticmethod
    def _config_of(plain: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def _affine(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _affine_per_sample(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x folds S samples as (S*B, ...); ``weight`` is (S, *weight_shape), ``bias`` (S, out)."""
        raise NotImplementedError

    def _moments(
        self,
        x: Tensor,
        mu: Tensor,
        weight_var: Tensor,
        bias_mean: Tensor | None,
        bias_var: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The pre-activations' mean x mu + b_mu and variance x^2 sigma^2 + b_var."""
        return self._affine(x, mu, bias_mean), self._affine(x.square(), weight_var, bias_var)

    # -- the tensors, as code written for the plain layer reads them -------------------------
    @property
    def weight(self) -> Tensor:
        """The weight of the current forward pass of the network: one draw W ~ q, the one the
        layer applies under weight reparameterization (the mean if frozen).

        Code written for the plain layer keeps working: a parent that reads ``fc.weight``
        (``F.linear(h, self.fc.weight.t())``, ``nn.TransformerEncoderLayer``'s eval fast path)
        gets the draw of this pass, every read in one pass the same one; outside a forward pass
        of the network every read is a new draw, as for a parametrized tensor. Under
        ``"local"`` or ``"flipout"`` a layer whose weight was read in the pass applies that
        draw (weight reparameterization) so that the two agree; read after the layer was
        applied, the draw is independent of the noise already used (warned once).
        """
        return self._weights()[0]

    @property
    def bias(self) -> Tensor | None:
        """The deterministic bias parameter, or, if the bias is variational, the draw of the
        current forward pass (see :attr:`weight`); ``None`` for a layer without bias."""
        if self.bias_posterior is None:
            return self._parameters["bias"]
        return self._weights()[1]

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        """(W, b) of the current forward pass: drawn once per pass of the network and kept for
        the rest of it (every call outside a pass draws anew); the means if frozen."""
        if self.weight_posterior.frozen:
            return self.weight_posterior.mean, self._bias_mean()
        if self.forward_pass.num_samples != 1:
            raise WeightReadInFold(
                f"a {type(self).__name__}'s weight was read while "
                f"{self.forward_pass.num_samples} samples are folded into one call, which no "
                "single weight can stand for (sample_forward then runs one call per sample)"
            )
        draws = self.forward_pass.draws
        key = (id(self), 1)
        drawn = None if draws is None else draws.get(key)
        if drawn is not None:
            return drawn
        if (
            draws is not None
            and (id(self), 0) in draws
            and not getattr(self, "_warned_read_after_use", False)
        ):
            self._warned_read_after_use = True
            warnings.warn(
                f"the weight of a {type(self).__name__} under estimator={self.estimator!r} was "
                "read after the layer was applied in the same forward pass: the weight read is "
                "a draw independent of the noise the layer used; use "
                "estimator='reparameterization' to share one weight draw",
                stacklevel=4,
            )
        drawn = self._draw()
        if draws is not None:
            draws[key] = drawn
        return drawn

    def _draw(self) -> tuple[Tensor, Tensor | None]:
        """One draw (W, b) ~ q, written into the forward pass's KL record."""
        joint = self._joint_uses(DRAW, called=True)
        if joint is None:  # in the same order as the joint node: the same noise
            weight = self.weight_posterior()  # the posterior records its own draw
            bias = self._bias_mean() if self.bias_posterior is None else self.bias_posterior()
            return weight, bias
        weight, bias = joint
        self._record(weight, bias, perturbation=False)
        return weight, bias

    # -- the estimators ---------------------------------------------------------------------
    def _bias_mean(self) -> Tensor | None:
        if self.bias_posterior is None:
            return self._parameters["bias"]
        return self.bias_posterior.mean

    def _joint_uses(
        self, use: int, sample_shape: tuple[int, ...] = (), called: bool = False
    ) -> list[Tensor] | None:
        """[weight's, bias's] ``use`` of sigma (``DRAW``, ``PERTURBATION`` or ``VARIANCE``) and
        their KLs from one autograd node (:func:`~bbb_lightning.bayes.posteriors.joint_uses`)
        when both posteriors are Gaussian and trained; None where that does not apply, and the
        caller asks each posterior in turn. ``called``: the caller would otherwise call the
        posteriors (``posterior()``), which runs their hooks: not where one has any."""
        weight_q, bias_q = self.weight_posterior, self.bias_posterior
        if not (
            native.active()
            and draws_as_mean_field_normal(type(weight_q))
            and draws_as_mean_field_normal(type(bias_q))
            and not bias_q.frozen
        ):
            return None
        if called and (_has_call_hooks(weight_q) or _has_call_hooks(bias_q)):
            return None
        return joint_uses((weight_q, bias_q), use, sample_shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight_posterior.frozen:
            return self._affine(x, self.weight_posterior.mean, self._bias_mean())
        num_samples = self._num_samples(x)
        draws = self.forward_pass.draws
        read = draws is not None and num_samples == 1 and (id(self), 1) in draws
        if self.estimator != "reparameterization" and not read:
            self._note_application()
            if native.active() and torch.is_inference_mode_enabled():
                return self._predictive_sample(x)
            if self.estimator == "local":
                return self._local_reparameterization(x)
            return self._flipout(x)
        if num_samples == 1:  # drawn once per forward pass: applied again, the same weights
            return self._affine(x, *self._weights())
        key = (id(self), num_samples)
        drawn = None if draws is None else draws.get(key)
        if drawn is not None:
            return self._affine_per_sample(x, *drawn)
        return self._per_sample_affine(x, num_samples, perturbation=False, remember=key)

    def _record(self, weight: Tensor, bias: Tensor | None, perturbation: bool) -> None:
        """Write the draws (or flipout's perturbations) into the forward pass's KL record."""
        record = self.forward_pass.record
        if record is None:
            return
        add = record.add_perturbation if perturbation else record.add_sample
        add(self.weight_posterior, weight)
        if self.bias_posterior is not None and bias is not None:
            add(self.bias_posterior, bias)

    def _note_application(self) -> None:
        """Local reparameterization and flipout draw noise per application: a layer applied
        twice in one forward pass does not share its weights between the two (warned once)."""
        draws = self.forward_pass.draws
        if draws is None:
            return
        key = (id(self), 0)
        if key in draws and not getattr(self, "_warned_reapplied", False):
            self._warned_reapplied = True
            warnings.warn(
                f"a {type(self).__name__} was applied twice in one forward pass: under "
                f"estimator={self.estimator!r} each application draws its own noise, as if "
                "its weights were not shared; use estimator='reparameterization' to share "
                "one weight draw",
                stacklevel=3,
            )
        draws[key] = True

    def _num_samples(self, x: Tensor) -> int:
        num_samples = self.forward_pass.num_samples
        if x.shape[0] % num_samples:
            raise ValueError(
                f"a batch of {x.shape[0]} rows cannot hold {num_samples} folded samples"
            )
        return num_samples

    def _per_sample_affine(
        self,
        x: Tensor,
        num_samples: int,
        perturbation: bool,
        remember: tuple[int, int] | None = None,
    ) -> Tensor:
        """Rows of sample s through (W_s, b_s): one weight draw per sample (for flipout, one
        perturbation W_s - mu), one batched affine map. The draws are recorded for the Monte
        Carlo KL, and under ``remember`` kept for the rest of the forward pass. Without gradients
        they are made in chunks of at most ``_MAX_DRAWN_WEIGHTS`` weights, each used while it
        is in cache, from one sigma, and neither recorded nor kept (a layer applied twice in one
        such pass draws twice)."""
        weight_q, bias_q = self.weight_posterior, self.bias_posterior
        held: dict[int, ScaleValues] = {}  # sigma of a Gaussian posterior, for all the chunks

        def draw(q: VariationalPosterior, count: int) -> Tensor:
            if perturbation:
                assert isinstance(q, MeanFieldNormal)
                return q.perturbation((count,), held.get(id(q)))
            if isinstance(q, MeanFieldNormal):
                return q.rsample((count,), held.get(id(q)))
            return q.rsample((count,))

        def plain_bias(count: int) -> Tensor | None:
            bias = self._parameters["bias"]
            return None if bias is None or perturbation else bias.expand(count, -1)

        chunk = max(1, _MAX_DRAWN_WEIGHTS // weight_q.mean.numel())
        if torch.is_grad_enabled() or chunk >= num_samples:
            joint = self._joint_uses(PERTURBATION if perturbation else DRAW, (num_samples,))
            if joint is None:
                weight = draw(weight_q, num_samples)
                bias = plain_bias(num_samples) if bias_q is None else draw(bias_q, num_samples)
            else:
                weight, bias = joint
            self._record(weight, bias, perturbation)
            draws = self.forward_pass.draws
            if remember is not None and draws is not None:
                draws[remember] = (weight, bias)
            return self._affine_per_sample(x, weight, bias)
        rows = x.shape[0] // num_samples
        held.update(
            (id(q), q.scale_values())
            for q in (weight_q, bias_q)
            if isinstance(q, MeanFieldNormal) and q.fast()
        )
        outputs = []
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            bias = plain_bias(count) if bias_q is None else draw(bias_q, count)
            part = x[start * rows : (start + count) * rows]
            outputs.append(self._affine_per_sample(part, draw(weight_q, count), bias))
        return torch.cat(outputs)

    def _predictive_sample(self, x: Tensor) -> Tensor:
        """Local reparameterization and flipout in inference mode: each example's
        pre-activations drawn from their exact marginal, by the cheaper of two ways.

        Both estimators give example n the pre-activations of its own valid weight draw; once
        no gradient can follow (``torch.inference_mode``, which Lightning's validation, test
        and predict loops use), their gradient variance no longer matters, only that
        distribution. On the S copies of one batch (the first layer) the mean and variance
        x mu + mu_b, x^2 sigma^2 + sigma_b^2 are computed once per example and S noisy rows
        drawn from them (local reparameterization). On an input that differs between samples,
        with at least ``_MIN_POSITIONS_FOR_WEIGHT_DRAWS`` output positions (rows x spatial
        positions) per sample, one weight draw W_s = mu + sigma eps_s per sample is applied to
        all of that sample's rows: one product instead of two. Every example's output keeps its
        distribution; two examples of one sample are then no longer independent.

        Plain ``torch.no_grad`` keeps the training-time estimator: a reentrant
        ``torch.utils.checkpoint`` runs its forward under it and recomputes it with
        gradients, and both must draw the same noise.
        """
        num_samples = self._num_samples(x)
        positions = x.numel() // max(1, num_samples * x.shape[self.CHANNEL_DIM])
        distinct = _distinct_rows(self.forward_pass, x)
        if distinct is not None or positions < _MIN_POSITIONS_FOR_WEIGHT_DRAWS:
            return self._local_reparameterization(x)
        if num_samples > 1:
            return self._per_sample_affine(x, num_samples, perturbation=False)
        return self._affine(x, *self._draw())

    def _local_reparameterization(self, x: Tensor) -> Tensor:
        weight_q, bias_q = self.weight_posterior, self.bias_posterior
        assert isinstance(weight_q, MeanFieldNormal)
        rows = _distinct_rows(self.forward_pass, x)
        distinct = x if rows is None else x[:rows]
        joint = self._joint_uses(VARIANCE)
        if joint is not None:
            weight_var, bias_var = joint
        else:
            bias_var = bias_q.variance() if isinstance(bias_q, MeanFieldNormal) else None
            weight_var = weight_q.variance()
        mean, variance = self._moments(
            distinct, weight_q.mu, weight_var, self._bias_mean(), bias_var
        )
        # One mean and variance for the S copies of each row, independent noise for each copy.
        sample_shape = () if rows is None else (x.shape[0] // rows,)
        out = sample_preactivations(mean, variance, sample_shape)
        return out if rows is None else out.flatten(0, 1)

    def _flipout(self, x: Tensor) -> Tensor:
        weight_q, bias_q = self.weight_posterior, self.bias_posterior
        assert isinstance(weight_q, MeanFieldNormal)
        # One shared perturbation per posterior sample: with S samples folded in the batch, the
        # S copies of an example must not share dW (they would only differ by random signs).
        num_samples = self._num_samples(x)
        rows = _distinct_rows(self.forward_pass, x)
        mean = self._affine(x if rows is None else x[:rows], weight_q.mu, self._bias_mean())
        signed = x * _random_signs(x, self.CHANNEL_DIM)
        if num_samples > 1:
            perturbation = self._per_sample_affine(signed, num_samples, perturbation=True)
        else:
            joint = self._joint_uses(PERTURBATION)
            if joint is not None:
                weight_noise, bias_noise = joint
            else:
                weight_noise = weight_q.perturbation()
                bias_noise = bias_q.perturbation() if isinstance(bias_q, MeanFieldNormal) else None
            self._record(weight_noise, bias_noise, perturbation=True)
            perturbation = self._affine(signed, weight_noise, bias_noise)
        perturbation = perturbation * _random_signs(perturbation, self.CHANNEL_DIM)
        if rows is None:
            return mean + perturbation
        # The mean of the S copies of each row is computed once.
        return (perturbation.unflatten(0, (num_samples, rows)) + mean).flatten(0, 1)

    # -- back to a plain module -------------------------------------------------------------
    def to_plain(self, weight: Tensor, bias: Tensor | None) -> nn.Module:
        """A plain ``nn.Linear``/``nn.ConvNd`` holding the given weight and bias."""
        plain = self.PLAIN(
            **self.plain_config,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            plain.weight.copy_(weight)
            if bias is not None:
                plain.bias.copy_(bias)
        return plain

    def extra_repr(self) -> str:
        config = ", ".join(f"{k}={v}" for k, v in self.plain_config.items())
        return f"{config}, estimator={self.estimator!r}"


class BayesianLinear(BayesianLayer):
    """Bayesian ``nn.Linear``: y = x W^T + b with W, b ~ q (see the module docstring).

    Example:
        >>> from bbb_lightning.bayes.priors import GaussianPrior
        >>> layer = BayesianLinear.from_module(nn.Linear(3, 2), GaussianPrior(), estimator="local")
        >>> layer(torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """

    PLAIN = nn.Linear
    CHANNEL_DIM = -1

    @staticmethod
    def _config_of(plain: nn.Module) -> dict[str, Any]:
        return {"in_features": plain.in_features, "out_features": plain.out_features}

    def _affine(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _moments(
        self,
        x: Tensor,
        mu: Tensor,
        weight_var: Tensor,
        bias_mean: Tensor | None,
        bias_var: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        return linear_moments(x, mu, weight_var, bias_mean, bias_var)

    def _affine_per_sample(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        samples = x.reshape(weight.shape[0], -1, x.shape[-1])
        if native.active():
            out = _PerSampleLinear.apply(*autocast_inputs(samples, weight, bias))
        else:  # what _PerSampleLinear computes, traceable by torch.compile and torch.func
            weight_t = weight.transpose(1, 2)
            out = (
                samples.bmm(weight_t)
                if bias is None
                else bias.unsqueeze(1).baddbmm(samples, weight_t)
            )
        return out.reshape(*x.shape[:-1], weight.shape[1])


class _PerSampleLinear(torch.autograd.Function):
    """y_s = x_s W_s^T + b_s for S samples: x (S, B, in), W (S, out, in), b (S, out) or None.

    The same products as autograd's ``baddbmm(b, x, W^T)``, except that the weight's gradient
    dL/dW_s = g_s^T x_s is computed directly in W's (S, out, in) layout. Through the transposed
    view autograd returns it as a transposed (S, in, out) tensor, which the posterior's
    backward would have to copy: S times the layer's weights, the largest copy of the step.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _BayesianConvNd(BayesianLayer):
    """Bayesian ``nn.ConvNd`` with the same stride, padding (any mode), dilation and groups."""

    CHANNEL_DIM = 1
    SPATIAL_DIMS: ClassVar[int]

    @staticmethod
    def _config_of(plain: nn.Module) -> dict[str, Any]:
        keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
        return {
            **{key: getattr(plain, key) for key in keys},
            "groups": plain.groups,
            "padding_mode": plain.padding_mode,
        }

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        config = self.plain_config
        padding = config["padding"]
        if config["padding_mode"] != "zeros":
            x = F.pad(x, self._explicit_padding(), mode=config["padding_mode"])
            padding = 0
        conv = _CONV_FUNCTIONS[self.SPATIAL_DIMS]
        return conv(x, weight, bias, config["stride"], padding, config["dilation"], groups)

    def _explicit_padding(self) -> list[int]:
        """``F.pad`` amounts for non-zero padding modes, last dimension first (as nn.ConvNd)."""
        config = self.plain_config
        padding = config["padding"]
        if isinstance(padding, str):  # 'same' (odd or even kernels) or 'valid'
            amounts = []
            for dilation, kernel in zip(config["dilation"], config["kernel_size"], strict=True):
                total = 0 if padding == "valid" else dilation * (kernel - 1)
                amounts.append((total // 2, total - total // 2))
        else:
            amounts = [(p, p) for p in padding]
        return [side for pair in reversed(amounts) for side in pair]

    def _affine(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv(x, weight, bias, self.plain_config["groups"])

    def _affine_per_sample(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        num_samples, out_channels = weight.shape[:2]
        batch = x.shape[0] // num_samples
        # (S*B, C, *spatial) -> (B, S*C, *spatial): one grouped convolution over all samples.
        grouped = x.reshape(num_samples, batch, *x.shape[1:]).transpose(0, 1)
        grouped = grouped.reshape(batch, num_samples * x.shape[1], *x.shape[2:])
        out = self._conv(
            grouped,
            weight.reshape(num_samples * out_channels, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            self.plain_config["groups"] * num_samples,
        )
        out = out.reshape(batch, num_samples, out_channels, *out.shape[2:]).transpose(0, 1)
        return out.reshape(num_samples * batch, out_channels, *out.shape[3:])


class BayesianConv1d(_BayesianConvNd):
    """Bayesian ``nn.Conv1d``."""

    PLAIN = nn.Conv1d
    SPATIAL_DIMS = 1


class BayesianConv2d(_BayesianConvNd):
    """Bayesian ``nn.Conv2d``.

    Example:
        >>> from bbb_lightning.bayes.priors import GaussianPrior
        >>> conv = BayesianConv2d.from_module(
        ...     nn.Conv2d(1, 4, 3), GaussianPrior(), estimator="flipout"
        ... )
        >>> conv(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 4, 6, 6])
    """

    PLAIN = nn.Conv2d
    SPATIAL_DIMS = 2


class BayesianConv3d(_BayesianConvNd):
    """Bayesian ``nn.Conv3d``."""

    PLAIN = nn.Conv3d
    SPATIAL_DIMS = 3


BAYESIAN_LAYERS: dict[type[nn.Module], type[BayesianLayer]] = {
    nn.Linear: BayesianLinear,
    nn.Conv1d: BayesianConv1d,
    nn.Conv2d: BayesianConv2d,
    nn.Conv3d: BayesianConv3d,
}
