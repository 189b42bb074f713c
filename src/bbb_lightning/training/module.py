"""The LightningModule: a Bayes-by-Backprop network trained on the minibatch negative ELBO.

The loss of minibatch i (see :mod:`bbb_lightning.training.objectives` for the weighting) is

    loss_i = [ NLL_i + kl_weight_i * KL(q || p) ] / B,
    NLL_i  = -(1/S) sum_s sum_b log p(y_b | x_b, w_s),       S = ``num_samples``.

Under data parallelism with R processes each rank sees B examples and gradients are averaged,
so the KL is divided by the global batch R * B: it enters each optimizer step's gradient
once, not once per rank. M is the number of optimizer steps in a full pass over the training
set and i counts optimizer steps, the same on every rank. With gradient accumulation over a
minibatches per step, each minibatch carries kl_weight_i / a of the KL (Lightning divides each
minibatch loss by a), so a step of a R B examples carries kl_weight_i KL once, as one step with
batch a R B would (an epoch's last step of g < a minibatches: each carries kl_weight_i / g, its
loss scaled by a / g). ``trainer.limit_train_batches`` shortens an epoch but leaves M alone.

Logged per example: ``loss``; ``nll`` = NLL_i / B; ``kl`` = KL / N (the KL each training
example carries over an epoch); ``kl_weight``; ``elbo`` = -(nll + kl), the per-example ELBO;
each as ``train/<name>_step`` (averaged over processes, every ``log_every_n_steps`` steps) and
``train/<name>_epoch`` (the mean over the epoch's examples on all processes; see
:mod:`bbb_lightning.training.step_logging`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from ..bayes import bayesianize, is_bayesian, sample_forward, sample_forward_with_kl
from ..bayes.arguments import positive_integer
from ..bayes.posteriors import VariationalPosterior
from ..bayes.priors import Prior
from ..evaluation.metrics import raw_log_likelihood
from .guard import (
    NONFINITE_MODES,
    NonFiniteError,
    first_nonfinite,
    keep_last_good_state,
    scaler_handles_nonfinite_gradients,
    stop_message,
)
from .objectives import CategoricalLikelihood, GaussianLikelihood, KLTerm, Likelihood
from .optimizer_state import with_configured_settings
from .seeding import derive_seed
from .step_logging import WeightedMeans, logs_this_step

__all__ = ["BayesByBackprop"]

Config = Mapping[str, Any]
# Logged as train/<name>_step (every log_every_n_steps steps) and train/<name>_epoch.
TRAIN_SCALARS = ("loss", "nll", "kl", "kl_weight", "elbo")
DEFAULT_OPTIMIZER: Config = {  # as conf/optimizer/adam.yaml
    "_target_": "torch.optim.Adam",
    "_partial_": True,
    "lr": 1e-3,
    "fused": True,
}
DEFAULT_POSTERIOR: Config = {
    "_target_": "bbb_lightning.bayes.MeanFieldNormal",
    "_partial_": True,
    "estimator": "local",
}


def _build(value: Any) -> Any:
    """Objects pass through; a mapping with ``_target_`` is instantiated (Hydra-style)."""
    return instantiate(value) if isinstance(value, Mapping) else value


def _full_precision(outputs: Tensor) -> Tensor:
    """``outputs`` in float32 if they are float16 or bfloat16 (a forward under mixed precision,
    ``trainer.precision=bf16-mixed``), else unchanged: the likelihood, the loss and the metrics
    are computed in float32, where bfloat16 would round the NLL to 3 significant digits."""
    reduced = isinstance(outputs, Tensor) and outputs.dtype in (torch.float16, torch.bfloat16)
    return outputs.float() if reduced else outputs


def _state_copy(value: Tensor | list[Tensor]) -> Tensor:
    """A metric state as one tensor (a list state, e.g. ECE's confidences, concatenated)."""
    if isinstance(value, list):
        return torch.cat(value) if value else torch.zeros(0)
    return value.detach().clone()


def _target_scales(target_std: Sequence[float] | None, likelihood: Likelihood) -> Tensor | None:
    """``target_std`` as a float32 tensor of one finite scale > 0 per target dimension."""
    if target_std is None:
        return None
    scales = torch.as_tensor(list(target_std), dtype=torch.float32).reshape(-1)
    dims = getattr(likelihood, "target_dim", None)
    valid = bool((scales > 0).all() & scales.isfinite().all())
    if dims is None or scales.numel() != dims or not valid:
        raise ValueError(
            f"target_std must be one finite scale > 0 per target dimension of a regression "
            f"likelihood (target_dim={dims}), got {list(target_std)!r}"
        )
    return scales


def compile_backends() -> list[str]:
    """The ``torch.compile`` backends a run may name: those torch lists here, with the
    debugging ones ``eager`` and ``aot_eager`` (tracing without code generation)."""
    return sorted({*torch.compiler.list_backends(), "eager", "aot_eager"})


def _compile_backend(compile: bool | str) -> str:
    if compile is True:
        return "inductor"
    if not isinstance(compile, str) or compile not in compile_backends():
        raise ValueError(
            f"compile must be true, false or a torch.compile backend "
            f"({', '.join(compile_backends())}), got {compile!r}"
        )
    return compile


class BayesByBackprop(LightningModule):
    """Train any network as a Bayesian neural network by Bayes by Backprop.

    Every component may be given as an object or as a config mapping with ``_target_``. Given
    as configs (as ``python -m bbb_lightning.train`` does), they are saved in the checkpoint and
    ``BayesByBackprop.load_from_checkpoint(path)`` rebuilds the model with no arguments.
    Components given as objects are not saved: pass them again, as for any LightningModule
    (``load_from_checkpoint(path, net=..., likelihood=...)``; likewise ``prior``, ``kl`` and
    ``optimizer``, which otherwise take their defaults), built the same way as for training.

    Args:
        net: the deterministic network; made Bayesian here (unless it already is).
        likelihood: :class:`CategoricalLikelihood` or :class:`GaussianLikelihood`.
        prior: p(w) for every weight (default N(0, 1)).
        posterior: builds q for one tensor (a class or ``_partial_`` config); a config may carry
            ``estimator``: ``reparameterization``, ``local`` (default, also for a class or
            config without it) or ``flipout``. With a posterior object, another estimator is
            chosen by making ``net`` Bayesian first (:func:`~bbb_lightning.bayes.bayesianize`).
        kl: a :class:`KLTerm` or its fields (weighting, reduction, scale, warmup_steps, ...).
        optimizer: called with the parameters (``_partial_`` config or factory); default Adam.
        scheduler: called with the optimizer (``_partial_`` config or factory, e.g.
            ``torch.optim.lr_scheduler.MultiStepLR``) and stepped once per epoch; None: the
            learning rate stays constant.
        num_samples: S, Monte Carlo likelihood samples per example in training.
        eval_samples: samples of the predictive at validation, test and prediction.
        include, exclude: glob patterns of the parameters to make (or keep from being) Bayesian.
        seed: if given, the randomness of training step t (posterior noise, dropout) is seeded
            from (seed, t, rank) (and the minibatch's place in the step, when gradients are
            accumulated), and that of each validation/test pass from (seed, epoch): a resumed
            run repeats an uninterrupted one exactly when its training order resumes too, as
            with the package's datamodules (:class:`~bbb_lightning.data.base.BBBDataModule`).
            A plain ``DataLoader`` does not: Lightning restarts it at the epoch's first batch
            when resuming mid-epoch, and a shuffling one draws its order from the global RNG.
        on_nonfinite: ``stop`` or ``skip`` a step whose loss or gradients are not finite
            (see :mod:`bbb_lightning.training.guard`).
        target_std: for regression on targets standardised as y' = (y - m) / s, the scales s
            (one per target dimension): validation and test then also log ``raw_rmse`` and
            ``raw_ll``, the RMSE and the predictive log-likelihood per example in the target's
            own units (:func:`~bbb_lightning.evaluation.metrics.raw_log_likelihood`).
        compile: ``torch.compile`` the network in place (``nn.Module.compile``): False, True
            (the default backend) or a backend name (:func:`compile_backends`). Compiled, the
            layers take the reference path (:mod:`bbb_lightning.bayes.functional`), which the
            compiler fuses; the native CPU kernels step aside.
    """

    def __init__(
        self,
        net: nn.Module | Config,
        likelihood: Likelihood | Config,
        prior: Prior | Config | None = None,
        posterior: Callable[..., VariationalPosterior] | Config = DEFAULT_POSTERIOR,
        kl: KLTerm | Config | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | Config = DEFAULT_OPTIMIZER,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | Config | None = None,
        num_samples: int = 1,
        eval_samples: int = 10,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        seed: int | None = None,
        on_nonfinite: str = "stop",
        target_std: Sequence[float] | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        objects = {"net": net, "likelihood": likelihood, "prior": prior, "posterior": posterior}
        objects |= {"kl": kl, "optimizer": optimizer, "scheduler": scheduler}
        self.save_hyperparameters(
            logger=False,
            ignore=[name for name, value in objects.items() if not isinstance(value, Mapping)],
        )
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(
                f"on_nonfinite must be one of {', '.join(NONFINITE_MODES)}; got {on_nonfinite!r}"
            )
        self.on_nonfinite = on_nonfinite
        self.seed = seed
        self.skipped_steps = 0
        self.input_range: tuple[float, float] | None = None  # of the training inputs
        self.num_samples = positive_integer("num_samples", num_samples)
        self.eval_samples = positive_integer("eval_samples", eval_samples)
        self.kl_term = kl if isinstance(kl, KLTerm) else KLTerm(**(kl or {}))
        self.likelihood = _build(likelihood)
        self.optimizer_factory = _build(optimizer)
        self.scheduler_factory = _build(scheduler)
        net = _build(net)
        if not is_bayesian(net):
            posterior_config = dict(posterior) if isinstance(posterior, Mapping) else None
            default_estimator = DEFAULT_POSTERIOR["estimator"]
            estimator = (posterior_config or {}).pop("estimator", default_estimator)
            bayesianize(
                net,
                prior=_build(prior),
                posterior=_build(posterior_config) if posterior_config else posterior,
                estimator=estimator,
                include=include,
                exclude=exclude,
            )
        if compile is not False:
            net.compile(backend=_compile_backend(compile))
        self.net = net
        self.target_std = _target_scales(target_std, self.likelihood)
        self.metrics = nn.ModuleDict(
            {stage: self._make_metrics() for stage in ("train_", "val_", "test_")}
        )
        self.train_means = WeightedMeans(TRAIN_SCALARS)

    # -- metrics ------------------------------------------------------------------------------
    @property
    def is_classifier(self) -> bool:
        return isinstance(self.likelihood, CategoricalLikelihood)

    def _make_metrics(self) -> MetricCollection:
        if isinstance(self.likelihood, CategoricalLikelihood):
            num_classes = self.likelihood.num_classes
            return MetricCollection(
                {
                    "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                    "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),
                }
            )
        metrics = {"rmse": MeanSquaredError(squared=False)}
        if self.target_std is not None:
            metrics["raw_rmse"] = MeanSquaredError(squared=False)
        # no compute groups: raw_rmse is updated with other values than rmse
        return MetricCollection(metrics, compute_groups=False)

    # -- forward and loss ---------------------------------------------------------------------
    def forward(self, x: Tensor, num_samples: int | None = None) -> Tensor:
        """Network outputs for S posterior draws (S = ``num_samples``, by default
        ``eval_samples``), shape (S, B, ...); float32 under mixed precision."""
        samples = self.eval_samples if num_samples is None else num_samples
        return _full_precision(sample_forward(self.net, x, samples))

    @property
    def num_train(self) -> int:
        """N, the number of training examples (global, whatever the number of processes)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "num_train"):
            return int(datamodule.num_train)
        return len(self.trainer.train_dataloader.dataset)

    def _optimizer_step_of(self, batch_idx: int) -> tuple[int, int, int]:
        """(i, M, g): the 0-based index in the epoch of the optimizer step this minibatch
        belongs to, M, the number of optimizer steps in a full pass over the training loader,
        and g, the number of minibatches of that step.

        i and M count optimizer steps (``accumulate_grad_batches`` = a minibatches make one),
        the same on every rank. g is a, except in an epoch's last step when a does not divide
        its minibatches. ``trainer.limit_train_batches`` shortens an epoch, not M: the KL stays
        weighted against the whole training set.
        """
        try:
            num_batches = len(self.trainer.train_dataloader)
        except TypeError:
            raise ValueError(
                "the training dataloader has no length: the ELBO's KL weighting needs M, the "
                "minibatches per epoch, and N, the training examples; give its dataset a "
                "__len__ (an IterableDataset: the number of examples it yields per epoch)"
            ) from None
        accumulate = self.trainer.accumulate_grad_batches
        step_index = batch_idx // accumulate
        this_epoch = min(num_batches, self.trainer.num_training_batches)
        group = min(accumulate, this_epoch - step_index * accumulate)
        return step_index, math.ceil(num_batches / accumulate), group

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        batch_size = x.shape[0]
        outputs, kl = sample_forward_with_kl(
            self.net, x, self.num_samples, self.kl_term.reduction, self.kl_term.monte_carlo
        )
        nll = self.likelihood.expected_nll(_full_precision(outputs), y)
        accumulate = self.trainer.accumulate_grad_batches
        step_index, num_steps, group = self._optimizer_step_of(batch_idx)
        kl_weight = self.kl_term.weight(step_index, num_steps, self.global_step)
        global_batch = batch_size * self.trainer.world_size
        # This minibatch's share of its step's loss (logged). Lightning divides each of a step's
        # g minibatch losses by a (also when g < a): scaled by a / g, with KL / g in each, the
        # step carries kl_weight * KL once over its g R B examples, as one step with that batch.
        minibatch_loss = nll / batch_size + (kl_weight / group) * kl / global_batch
        loss = (accumulate / group) * minibatch_loss
        bad_term = first_nonfinite([("NLL", nll), ("KL", kl), ("loss", loss)])
        if self._any_rank(bad_term is not None):
            what = f"{bad_term} (nll={nll.item():.4g}, kl={kl.item():.4g})" if bad_term else None
            return self._nonfinite(self._first_on_any_rank(what))

        kl_per_example = kl.detach() / self.num_train
        nll_per_example = nll.detach() / batch_size
        elbo = -(nll_per_example + kl_per_example)
        kl_weight_value = torch.tensor(kl_weight, dtype=loss.dtype, device=loss.device)
        logged = torch.stack(
            [minibatch_loss.detach(), nll_per_example, kl_per_example, kl_weight_value, elbo]
        )
        self.train_means.update(logged, batch_size)
        if logs_this_step(self.trainer):
            named = zip(TRAIN_SCALARS, logged, strict=True)
            self.log_dict(
                {f"train/{name}_step": value for name, value in named},
                on_step=True,
                on_epoch=False,
                batch_size=batch_size,
                sync_dist=True,
            )
        self._update_metrics("train_", outputs.detach(), y)  # logged at epoch end
        return loss

    def on_train_epoch_end(self) -> None:
        """Epoch means of the step scalars and the training metrics (over all processes)."""
        # compute() already reduces over processes; sync_dist then averages equal values (and
        # keeps Lightning from warning that an epoch value is not synchronised).
        if self.train_means.update_count:
            means = self.train_means.compute()
            self.log_dict(
                {f"train/{name}_epoch": value for name, value in means.items()}, sync_dist=True
            )
            self.train_means.reset()
        metrics = self.metrics["train_"]
        if any(metric.update_count for metric in metrics.values()):
            computed = metrics.compute()
            self.log_dict({f"train/{k}": v for k, v in computed.items()}, sync_dist=True)
            metrics.reset()

    # -- non-finite guard and seeding ---------------------------------------------------------
    def _any_rank(self, flag: bool) -> bool:
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _first_on_any_rank(self, what: str | None) -> str:
        """The description of a non-finite term on the first process that has one (``what``
        on this process, None where its terms are finite), the same on every process.

        Called by every process together once :meth:`_any_rank` found one; under data
        parallelism the description names the process, so that the others do not report their
        own finite values.
        """
        world_size = self.trainer.world_size
        if world_size == 1 or not torch.distributed.is_initialized():
            return what or "loss"
        gathered: list[str | None] = [None] * world_size
        torch.distributed.all_gather_object(gathered, what)
        rank, first = next((r, w) for r, w in enumerate(gathered) if w is not None)
        return f"{first} on process {rank}"

    def _nonfinite(self, what: str) -> None:
        """Stop (after keeping the last good state) or skip the current step."""
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), sync_dist=False)
            return None
        saved = keep_last_good_state(self.trainer, self)
        raise NonFiniteError(stop_message(what, self.global_step, saved))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        bad = first_nonfinite((f"gradient of {n}", p.grad) for n, p in self.named_parameters())
        if not self._any_rank(bad is not None) or scaler_handles_nonfinite_gradients(self.trainer):
            return
        if self.on_nonfinite == "skip":
            optimizer.zero_grad(set_to_none=True)  # the step then changes nothing
        self._nonfinite(bad or "gradient (on another process)")

    def _reseed(self, *keys: object) -> None:
        if self.seed is not None:
            torch.manual_seed(derive_seed(self.seed, *keys, self.global_rank))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        accumulate = self.trainer.accumulate_grad_batches
        # the minibatches accumulated into one step draw independent noise
        within_step = (batch_idx % accumulate,) if accumulate > 1 else ()
        self._reseed("train", self.global_step, *within_step)

    def on_validation_epoch_start(self) -> None:
        self._reseed("val", self.current_epoch)

    def on_test_epoch_start(self) -> None:
        self._reseed("test")

    def on_predict_epoch_start(self) -> None:
        self._reseed("predict")

    def _train_epoch_metrics(self) -> list[Metric]:
        """The metrics that accumulate over a training epoch: the step scalars' means and the
        training accuracy/ECE or RMSE."""
        return [self.train_means, *self.metrics["train_"].values()]

    def on_fit_start(self) -> None:
        """Note the range of the training inputs (of a datamodule whose training set is a
        ``TensorDataset``), for ``predict`` to tell inputs in other units (pixels 0..255 where
        the run trained on normalised ones)."""
        train_set = getattr(getattr(self.trainer, "datamodule", None), "train_set", None)
        inputs = getattr(train_set, "tensors", (None,))[0]
        if isinstance(inputs, Tensor) and inputs.is_floating_point() and inputs.numel():
            self.input_range = (float(inputs.min()), float(inputs.max()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also keep the current epoch's accumulated training metrics, summed over processes
        (every process takes part): a run resumed from a checkpoint taken mid-epoch
        (``val_check_interval`` < 1) then logs the epoch's means over all of its minibatches;
        and the training inputs' range (``input_range``)."""
        checkpoint["skipped_steps"] = self.skipped_steps
        if self.input_range is not None:
            checkpoint["input_range"] = list(self.input_range)
        states = []
        for metric in self._train_epoch_metrics():
            with metric.sync_context():
                states.append(
                    {name: _state_copy(getattr(metric, name)) for name in metric._defaults}
                )
        checkpoint["train_epoch_metrics"] = {"epoch": self.current_epoch, "states": states}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the step counters and epoch metrics; when training resumes, the saved
        optimizer state takes this config's optimizer settings (:mod:`.optimizer_state`)."""
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self._resumed_epoch_metrics = checkpoint.get("train_epoch_metrics")
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if not fitting or not checkpoint.get("optimizer_states"):
            return
        (saved,) = checkpoint["optimizer_states"]  # configure_optimizers builds one
        configured = self._optimizer_and_scheduler()[0].state_dict()
        state, changes = with_configured_settings(saved, configured)
        checkpoint["optimizer_states"] = [state]
        for scheduler in checkpoint.get("lr_schedulers") or []:  # the configured base rates
            if "base_lrs" in scheduler:
                scheduler["base_lrs"] = [
                    group["initial_lr"] for group in configured["param_groups"]
                ]
        if changes:
            rank_zero_info(f"Resuming with the configured optimizer settings: {changes}")

    def on_train_epoch_start(self) -> None:
        """Under a learning-rate schedule, log the epoch's rate as ``train/lr``."""
        if self.scheduler_factory is not None:
            lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            self.log("train/lr", lr, on_step=False, on_epoch=True, sync_dist=False)

    def on_train_start(self) -> None:
        """A run resumed within an epoch continues that epoch's training metrics (on rank 0,
        which then holds their sums over every process; the others start from zero)."""
        resumed, self._resumed_epoch_metrics = getattr(self, "_resumed_epoch_metrics", None), None
        if resumed is None or resumed["epoch"] != self.current_epoch or self.global_rank != 0:
            return
        if not resumed["states"][0]["weight"] > 0:  # saved after the epoch's means were logged
            return
        for metric, states in zip(self._train_epoch_metrics(), resumed["states"], strict=True):
            for name, value in states.items():
                default = metric._defaults[name]
                value = value.to(self.device)
                setattr(metric, name, [value] if isinstance(default, list) else value)
            metric._update_count = 1  # counted as updated: compute() reads the restored sums

    def _update_metrics(self, stage: str, outputs: Tensor, y: Tensor) -> MetricCollection:
        """Update the stage's metrics with the predictive of ``outputs``; return them."""
        metrics = self.metrics[stage]
        if self.is_classifier:
            metrics.update(CategoricalLikelihood.predictive_probs(outputs), y)
        else:
            assert isinstance(self.likelihood, GaussianLikelihood)
            mean, _, _ = self.likelihood.predictive_moments(outputs)
            metrics["rmse"].update(mean, y)
            if self.target_std is not None:
                scale = self.target_std.to(mean)
                metrics["raw_rmse"].update(mean * scale, y * scale)
        return metrics

    def _evaluate(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        outputs = self(x, self.eval_samples)
        nll = self.likelihood.predictive_nll(outputs, y).mean()
        self.log(f"{stage}/nll", nll, batch_size=x.shape[0], sync_dist=True, prog_bar=True)
        if self.target_std is not None and not self.is_classifier:
            raw_ll = raw_log_likelihood(nll, self.target_std)
            self.log(f"{stage}/raw_ll", raw_ll, batch_size=x.shape[0], sync_dist=True)
        metrics = self._update_metrics(f"{stage}_", outputs, y)
        self.log_dict(
            {f"{stage}/{key}": metric for key, metric in metrics.items()},
            on_step=False,
            on_epoch=True,
            prog_bar=True,
        )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predictive class probabilities (B, C), or predictive mean (B, D) for regression."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        outputs = self(x, self.eval_samples)
        self.likelihood.check_outputs(outputs)
        if self.is_classifier:
            return CategoricalLikelihood.predictive_probs(outputs)
        assert isinstance(self.likelihood, GaussianLikelihood)
        return self.likelihood.predictive_moments(outputs)[0]

    def _optimizer_and_scheduler(
        self,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer, None
        return optimizer, self.scheduler_factory(optimizer)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """The optimizer; with a scheduler, Lightning's dict stepping it once per epoch."""
        optimizer, scheduler = self._optimizer_and_scheduler()
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
