"""Hydra config groups shipped with the package (`python -m bbb_lightning.train --help`)."""
