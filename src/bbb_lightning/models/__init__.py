"""The deterministic networks the configs name (MLP, CNN, the CIFAR ResNet-20); any
``nn.Module`` is made Bayesian by :func:`bbb_lightning.bayes.bayesianize`."""
