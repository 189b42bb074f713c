"""Analyses of a trained posterior: metrics (accuracy, NLL, ECE, Brier, entropy, mutual
information), out-of-distribution detection, robustness, pruning by signal-to-noise, export and
figures."""
