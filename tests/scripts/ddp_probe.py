"""Record each training step's loss, KL weight and (averaged) gradients, per process, the
epoch's logged mean loss, and the test inputs each process evaluated.

Run by tests/test_scale.py as ``python ddp_probe.py <out_dir> <batch_size> <override> ...``:
it composes the real config, fixes the posterior noise (predicts with the posterior mean), and
runs ``train`` for three steps; Lightning's DDP launcher re-runs this script for rank 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module

from bbb_lightning.bayes import freeze
from bbb_lightning.train import train


class Probe(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.steps: list[dict] = []
        self.losses: list[float] = []
        self.test_inputs: list[torch.Tensor] = []
        self.loss_epoch = float("nan")

    def on_fit_start(self, trainer, pl_module):
        freeze(pl_module.net)  # the posterior mean: no noise, only the batches differ

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))  # per minibatch (several per accumulated step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        logged = trainer.callback_metrics
        self.steps.append(
            {
                "step": trainer.global_step,
                "kl_weight": float(logged["train/kl_weight_step"]),
                "grads": {n: p.grad.clone() for n, p in pl_module.named_parameters()},
            }
        )

    def on_train_end(self, trainer, pl_module):
        self.loss_epoch = float(trainer.callback_metrics["train/loss_epoch"])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test_inputs.append(batch[0].clone())

    def on_test_end(self, trainer, pl_module):
        record = {
            "steps": self.steps,
            "losses": self.losses,
            "loss_epoch": self.loss_epoch,
            "test_inputs": torch.cat(self.test_inputs),
        }
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out_dir, batch_size, *overrides = sys.argv[1:]
    out_dir = Path(out_dir)
    with initialize_config_module("bbb_lightning.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"paths.output_dir={out_dir / 'run'}",
                f"dataset.batch_size={batch_size}",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=3",
                "trainer.log_every_n_steps=1",
                "callbacks.progress_bar=null",
                "+callbacks.probe._target_=ddp_probe.Probe",
                f"+callbacks.probe.out_dir={out_dir}",
                *overrides,
            ],
        )
    train(cfg)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # for callbacks.probe._target_
    main()
