"""bbb-lightning: Bayes by Backprop (Blundell et al. 2015) on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
