"""Lines the libraries print on every run that tell a user nothing, silenced by the entry points.

- Lightning's tip to install ``litlogger`` (each ``Trainer``);
- the deprecation of ``LeafSpec`` that Lightning's own ``_pytree`` triggers in torch;
- ModelCheckpoint's "directory exists and is not empty" (a run into a used directory is
  refused before, by :func:`~bbb_lightning.cli.run_dir_checks.check_fresh_output_dir`; a resume
  in place is meant to find it full);
- alembic's "setup plugin ..." lines when Optuna's sweeper is imported.

Everything else (our warnings, Lightning's real ones) is left as it is.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["silence_library_noise"]

_LIGHTNING_TIP = "💡 Tip: For seamless cloud logging"


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_TIP)


def silence_library_noise() -> None:
    """Install the filters (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTip) for f in logger.filters):
            logger.addFilter(_DropLightningTip())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    logging.getLogger("alembic").setLevel(logging.WARNING)
