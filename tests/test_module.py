"""The LightningModule's loss against a hand computation, for each KL weighting."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.utils.data import DataLoader, TensorDataset

from bbb_lightning.bayes import GaussianPrior, MeanFieldNormal, freeze
from bbb_lightning.training.module import BayesByBackprop
from bbb_lightning.training.objectives import CategoricalLikelihood, GaussianLikelihood, KLTerm
from bbb_lightning.training.seeding import derive_seed


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.records: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x, y = batch
        self.records.append((batch_idx, x, y, float(outputs["loss"])))


def _fit_frozen(kl: KLTerm, num_examples: int = 10, batch_size: int = 4, **trainer_options):
    torch.manual_seed(0)
    x = torch.randn(num_examples, 2)
    y = torch.randn(num_examples, 1)
    model = BayesByBackprop(
        net=nn.Sequential(nn.Linear(2, 1)),
        likelihood=GaussianLikelihood(target_dim=1, noise="fixed", noise_std=0.5),
        prior=GaussianPrior(0.0, 1.0),
        posterior=functools.partial(MeanFieldNormal, rho_init=(-2.0, 0.0)),
        kl=kl,
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
    )
    freeze(model.net)  # forwards use the posterior mean: the NLL is deterministic
    recorder = RecordLosses()
    _fit_one_epoch(model, TensorDataset(x, y), batch_size, recorder, **trainer_options)
    return model, recorder.records


def _fit_one_epoch(
    model: BayesByBackprop,
    data: TensorDataset,
    batch_size: int,
    recorder: pl.Callback,
    **trainer_options,
) -> None:
    """One epoch over ``data`` in order, with nothing written and ``recorder`` watching."""
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        **trainer_options,
    )
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=batch_size))


@torch.no_grad()
def _hand_loss(model, x, y, kl_weight: float, reduction: str = "sum") -> float:
    layer = model.net[0]
    w_q, b_q = layer.weight_posterior, layer.bias_posterior
    mean = x.double() @ w_q.mu.double().T + b_q.mu.double()
    nll = -Normal(mean, 0.5).log_prob(y.double()).sum()  # noise=fixed: sigma = noise_std
    kl = sum(
        kl_divergence(
            Normal(q.mu.double(), torch.log1p(torch.exp(q.rho.double()))), Normal(0.0, 1.0)
        ).sum()
        for q in (w_q, b_q)
    )
    if reduction == "mean":
        kl = kl / 3  # two weights and one bias
    return (nll / x.shape[0] + kl_weight * kl / x.shape[0]).item()


@pytest.mark.parametrize(
    ("kl", "weights"),
    [
        (KLTerm(weighting="uniform"), [1 / 3, 1 / 3, 1 / 3]),
        (KLTerm(weighting="minibatch"), [4 / 7, 2 / 7, 1 / 7]),  # 2^(M-i) / (2^M - 1), M = 3
        (KLTerm(weighting="uniform", reduction="mean"), [1 / 3, 1 / 3, 1 / 3]),
        (
            KLTerm(weighting="minibatch", scale=0.5, warmup_steps=4),
            [0, 0.5 * 0.25 * 2 / 7, 0.5 * 0.5 / 7],
        ),
    ],
    ids=["uniform", "minibatch", "mean-reduction", "warmup-and-scale"],
)
def test_loss_matches_hand_computation(kl, weights):
    model, records = _fit_frozen(kl)
    assert [r[0] for r in records] == [0, 1, 2]  # M = 3 minibatches: 4 + 4 + 2 examples
    for (batch_idx, x, y, loss), weight in zip(records, weights, strict=True):
        # warm-up: step t = batch_idx, factor min(1, t / 4), is folded into ``weights``
        expected = _hand_loss(model, x, y, weight, kl.reduction)
        assert loss == pytest.approx(expected, rel=1e-5), batch_idx


@pytest.mark.parametrize(
    ("kl", "weights"),
    [
        (KLTerm(weighting="uniform"), [1 / 3, 1 / 3]),
        (KLTerm(weighting="minibatch"), [4 / 7, 2 / 7]),
    ],
    ids=["uniform", "minibatch"],
)
def test_limit_train_batches_shortens_the_epoch_not_m(kl, weights):
    """Two of the three minibatches per epoch: M stays 3, the KL weighted against all N."""
    model, records = _fit_frozen(kl, limit_train_batches=2)
    assert [r[0] for r in records] == [0, 1]
    for (batch_idx, x, y, loss), weight in zip(records, weights, strict=True):
        assert loss == pytest.approx(_hand_loss(model, x, y, weight), rel=1e-5), batch_idx


class RecordSeeds(pl.Callback):
    def __init__(self) -> None:
        self.seeds: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seeds.append(torch.initial_seed())  # the module's on_train_batch_start seeded it


@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_minibatch_of_a_step_draws_its_own_noise(accumulate):
    """Minibatches accumulated into one step were seeded alike (the same noise, row for row)."""
    model = BayesByBackprop(
        net=nn.Sequential(nn.Linear(2, 1)), likelihood=GaussianLikelihood(target_dim=1), seed=3
    )
    recorder = RecordSeeds()
    data = TensorDataset(torch.randn(16, 2), torch.randn(16, 1))
    _fit_one_epoch(model, data, 4, recorder, accumulate_grad_batches=accumulate)
    assert len(set(recorder.seeds)) == 4  # 4 minibatches: 4 or 2 steps, 4 streams of noise
    if accumulate == 1:  # unchanged: (seed, step, rank)
        assert recorder.seeds == [derive_seed(3, "train", step, 0) for step in range(4)]


def test_the_default_optimizer_is_a_fused_adam_with_adams_updates():
    """The default (module and ``conf/optimizer/adam.yaml``) is torch's fused Adam: one kernel
    over all parameters, the same updates as the per-tensor implementation to float32 rounding."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("bbb_lightning.conf", version_base=None):
        composed = compose("config")
    assert composed.optimizer.fused is True

    torch.manual_seed(0)
    model = BayesByBackprop(
        net=nn.Sequential(nn.Linear(3, 2)), likelihood=GaussianLikelihood(target_dim=2)
    )
    fused = model.configure_optimizers()
    assert isinstance(fused, torch.optim.Adam) and fused.defaults["fused"] is True
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    reference_params = [p.detach().clone().requires_grad_() for p in params]
    reference = torch.optim.Adam(reference_params, lr=1e-3, foreach=False, fused=False)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, reference_params, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
    for p, q, p0 in zip(params, reference_params, start, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
        assert (p.detach() - p0).abs().min() > 1e-4  # every weight moved (5 steps of ~1e-3)


def test_predict_names_outputs_that_do_not_fit_the_likelihood():
    """A classifier whose net returns 5 logits for 3 classes predicted (B, 5) 'probabilities'."""
    model = BayesByBackprop(net=nn.Sequential(nn.Linear(2, 5)), likelihood=CategoricalLikelihood(3))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    with pytest.raises(ValueError, match=r"num_outputs=3"):
        trainer.predict(model, loader)


def test_sample_counts_take_numpy_integers_and_refuse_bools_and_zero():
    """np.int64(3) was refused as 'not an integer', True taken as one sample, and
    ``model(x, 0)`` silently drew eval_samples."""
    net = nn.Sequential(nn.Linear(2, 3))
    model = BayesByBackprop(
        net, CategoricalLikelihood(3), num_samples=np.int64(3), eval_samples=np.int32(4)
    )
    assert (model.num_samples, model.eval_samples) == (3, 4)
    assert type(model.num_samples) is int
    assert model(torch.randn(5, 2)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1, got 0"):
        model(torch.randn(5, 2), 0)
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1, got True"):
        BayesByBackprop(net, CategoricalLikelihood(3), num_samples=True)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, sized: bool) -> None:
        self.x, self.y, self.sized = x, y, sized

    def __iter__(self):
        return zip(self.x, self.y, strict=True)

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("no length")
        return len(self.x)


def test_an_iterable_dataset_needs_a_length_and_then_weights_the_kl_by_it():
    """M = ceil(N / B) minibatches of the sized stream: kl_weight 1/3 for N = 10, B = 4."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 2), torch.randn(10, 1)
    model = BayesByBackprop(nn.Sequential(nn.Linear(2, 1)), GaussianLikelihood(noise="fixed"))
    with pytest.raises(ValueError, match=r"the training dataloader has no length: .* __len__"):
        _fit_one_epoch(model, _Stream(x, y, sized=False), 4, RecordLosses())
    recorder = RecordLosses()
    _fit_one_epoch(model, _Stream(x, y, sized=True), 4, recorder)
    assert [r[0] for r in recorder.records] == [0, 1, 2]
    assert model.trainer.callback_metrics["train/kl_weight_epoch"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "posterior",
    [
        {"_target_": "bbb_lightning.bayes.MeanFieldNormal", "_partial_": True, "rho_init": -3.0},
        MeanFieldNormal,
        functools.partial(MeanFieldNormal, rho_init=-3.0),
    ],
    ids=["config-without-estimator", "class", "partial"],
)
def test_the_estimator_is_local_unless_a_config_names_another(posterior):
    """Documented 'local (default)'; a posterior config without estimator (e.g. to set
    rho_init) or a posterior class silently switched to weight reparameterization."""
    net = nn.Sequential(nn.Linear(2, 3))
    model = BayesByBackprop(net, CategoricalLikelihood(3), posterior=posterior)
    assert model.net[0].estimator == "local"
    named = {"_target_": "bbb_lightning.bayes.MeanFieldNormal", "_partial_": True}
    named |= {"estimator": "flipout"}
    model = BayesByBackprop(
        nn.Sequential(nn.Linear(2, 3)), CategoricalLikelihood(3), posterior=named
    )
    assert model.net[0].estimator == "flipout"
