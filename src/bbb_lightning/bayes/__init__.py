"""Bayes by Backprop in pure PyTorch: make any ``nn.Module`` a Bayesian neural network.

Nothing here imports Lightning or Hydra.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from bbb_lightning.bayes import bayesianize, kl_divergence, sample_forward
    >>> net = bayesianize(nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1)))
    >>> sample_forward(net, torch.randn(8, 3), num_samples=10).shape
    torch.Size([10, 8, 1])
    >>> bool(kl_divergence(net) > 0)
    True
"""

from .convert import bayesianize, is_bayesian
from .kl import kl_divergence, posterior_kl
from .layers import (
    ESTIMATORS,
    BayesianConv1d,
    BayesianConv2d,
    BayesianConv3d,
    BayesianLayer,
    BayesianLinear,
)
from .posteriors import (
    MeanFieldNormal,
    VariationalPosterior,
    all_posteriors,
    named_posteriors,
    posterior_scales,
    signal_to_noise,
)
from .priors import (
    EmpiricalPrior,
    GaussianPrior,
    LaplacePrior,
    Prior,
    ScaleMixtureNormal,
    ScaleMixturePrior,
)
from .radial import RadialPosterior
from .sampling import (
    freeze,
    posterior_mean,
    posterior_mean_network,
    sample_forward,
    sample_forward_with_kl,
    sample_network,
    unfreeze,
)

__all__ = [
    "ESTIMATORS",
    "BayesianConv1d",
    "BayesianConv2d",
    "BayesianConv3d",
    "BayesianLayer",
    "BayesianLinear",
    "EmpiricalPrior",
    "GaussianPrior",
    "LaplacePrior",
    "MeanFieldNormal",
    "Prior",
    "RadialPosterior",
    "ScaleMixtureNormal",
    "ScaleMixturePrior",
    "VariationalPosterior",
    "all_posteriors",
    "bayesianize",
    "freeze",
    "is_bayesian",
    "kl_divergence",
    "named_posteriors",
    "posterior_kl",
    "posterior_mean",
    "posterior_mean_network",
    "posterior_scales",
    "sample_forward",
    "sample_forward_with_kl",
    "sample_network",
    "signal_to_noise",
    "unfreeze",
]
