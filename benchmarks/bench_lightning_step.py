"""What the training entry point adds to a Bayes-by-Backprop step: Lightning against a plain loop.

Both train the MNIST MLP 784-400-400-10 of ``python -m bbb_lightning.train dataset=mnist``
(local reparameterization, N(0, 1) prior, Adam, batch 128) on the same minibatches:

- ``lightning``: the real composed config, ``build_model`` and a ``Trainer`` with the real
  callbacks and the TensorBoard logger (progress bar off); each step timed from
  ``on_train_batch_start`` to ``on_train_batch_end`` (forward, loss, KL, backward, non-finite
  guard, optimizer, logging; not data loading);
- ``plain``: the same network and loss in a bare PyTorch loop (``sample_forward``,
  ``kl_divergence``, ``backward``, ``Adam.step``).

Both run with the allocator setting of the composed config (``retain_freed_memory``, on by
default, as in ``python -m bbb_lightning.train``).

Rounds alternate the two; the report is the median step time of each and the median ratio.
Run from the repository root::

    python benchmarks/bench_lightning_step.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from bbb_lightning.bayes import kl_divergence, sample_forward
from bbb_lightning.train import build_model
from bbb_lightning.training.allocator import retain_freed_memory


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/MNIST"))
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optimizer.lr=0.01")
    args = parser.parse_args()
    for name in ("steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be at least 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    warmup = 10

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_module("bbb_lightning.conf", version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    f"paths.output_dir={tmp}",
                    "dataset=mnist",
                    f"dataset.data_dir={args.data_dir.resolve()}",
                    "dataset.download=false",
                    "trainer.max_epochs=1",
                    f"trainer.limit_train_batches={warmup + args.steps}",
                    "trainer.limit_val_batches=0",
                    "+trainer.num_sanity_val_steps=0",
                    "+trainer.enable_checkpointing=false",
                    "callbacks.progress_bar=null",
                    "callbacks.model_checkpoint=null",
                    "trainer.enable_model_summary=false",
                    *args.overrides,
                ],
            )
        if cfg.retain_freed_memory:  # as the train entry point does
            retain_freed_memory()
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")
        loader = iter(datamodule.train_dataloader())
        batches = [next(loader) for _ in range(warmup + args.steps)]

        def lightning_round() -> list[float]:
            timer = StepTimer()
            callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
            logger = instantiate(cfg.logger.tensorboard)
            trainer = instantiate(
                cfg.trainer, callbacks=[*callbacks, timer], logger=logger, enable_progress_bar=False
            )
            trainer.fit(build_model(cfg, datamodule), datamodule=datamodule)
            return timer.seconds[warmup:]

        def plain_round() -> list[float]:
            model = build_model(cfg, datamodule)
            net, likelihood = model.net, model.likelihood
            optimizer = model.configure_optimizers()
            num_train, seconds = datamodule.num_train, []
            for x, y in batches:
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                nll = likelihood.expected_nll(sample_forward(net, x, 1), y)
                kl = kl_divergence(net)
                (nll / len(x) + kl / num_train).backward()
                optimizer.step()
                seconds.append(time.perf_counter() - start)
            return seconds[warmup:]

        lightning, plain, ratios = [], [], []
        for _ in range(args.rounds):
            p = statistics.median(plain_round())
            lt = statistics.median(lightning_round())
            plain.append(p)
            lightning.append(lt)
            ratios.append(lt / p)

    print(f"# {args.rounds} rounds of {args.steps} steps, {args.threads} threads")
    print(f"plain loop step      {statistics.median(plain) * 1e3:7.2f} ms")
    print(f"Lightning step       {statistics.median(lightning) * 1e3:7.2f} ms")
    print(f"Lightning / plain    {statistics.median(ratios):7.2f}x")


if __name__ == "__main__":
    main()
