"""CIFAR-10 and CIFAR-100 from the python-pickle batches, decoded once into memory.

Training images are augmented as in He et al. (2016): each epoch, every image is padded by
``crop_padding`` black pixels on each side, a random 32 x 32 window of it is taken, and it is
flipped left-right with probability 1/2. Validation and test images are not augmented. Every
image is then normalised per channel, ``x_c = (pixel_c - mean_c) / std_c``, with the mean and
standard deviation of channel c over the training images (the validation part left out).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from bbb_lightning.data.base import BBBDataModule, _check_int
from bbb_lightning.data.pickle_batches import (
    CIFAR_SETS,
    CifarSet,
    download_archive,
    find_copy,
    read_batches,
    read_class_names,
)
from bbb_lightning.training.seeding import derive_seed

__all__ = ["CIFARDataModule", "RandomCropFlip", "channel_moments"]


def channel_moments(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (``1/n``, floored at 1e-3) of ``uint8
    (N, C, H, W)`` pixels, exact: from each channel's histogram of the 256 values, in float64,
    without a float copy of the images.

    Example:
        >>> channel_moments(torch.tensor([[[[0, 2]], [[5, 5]]]], dtype=torch.uint8))
        ([1.0, 5.0], [1.0, 0.001])
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for channel in images.unbind(1):  # uint8: bincount counts them as they are
        counts = torch.bincount(channel.reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean).square()).sum() / counts.sum()
        means.append(mean.item())
        stds.append(max(var.sqrt().item(), 1e-3))
    return means, stds


class RandomCropFlip(Dataset):
    """Training images of one epoch, randomly cropped and flipped, then normalised.

    The crop offsets and flips of epoch ``epoch`` are drawn once from (``seed``, ``epoch``):
    example i of an epoch is the same whatever the order, the loader's workers or the number of
    processes, and a resumed run sees the images of an uninterrupted one.

    Args:
        images: ``uint8 (N, C, H, W)`` pixels.
        labels: ``int64 (N,)``.
        mean, std: per-channel ``(C,)`` in pixel units: ``x = (pixels - mean) / std``.
        padding: black pixels added on each side before the ``H x W`` crop (0: no crop).
        seed, epoch: what the epoch's crops and flips are drawn from.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Tensor,
        std: Tensor,
        padding: int,
        seed: int,
        epoch: int,
    ) -> None:
        self.images, self.labels, self.padding = images, labels, padding
        self.mean, self.std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        generator = torch.Generator().manual_seed(derive_seed(seed, "augment", epoch))
        self.offsets = torch.randint(0, 2 * padding + 1, (len(images), 2), generator=generator)
        self.flips = torch.rand(len(images), generator=generator) < 0.5

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.padding:
            height, width = image.shape[-2:]
            top, left = self.offsets[index].tolist()
            padded = F.pad(image, (self.padding,) * 4)
            image = padded[:, top : top + height, left : left + width]
        if self.flips[index]:
            image = image.flip(-1)
        return (image.float() - self.mean) / self.std, self.labels[index]


class CIFARDataModule(BBBDataModule):
    """CIFAR-10 or CIFAR-100: images ``float32 (B, 3, 32, 32)``, labels ``int64``.

    The 50,000 training images are split by a permutation drawn from ``seed`` into training
    and ``val_size`` validation images; the test set is the 10,000 test images. CIFAR-100's
    labels are its 100 fine classes. The copy is looked up in ``data_dir`` in the layouts of
    :mod:`bbb_lightning.data.pickle_batches` (the batch folder, torchvision's root, the
    ``.tar.gz``); :meth:`prepare_data` downloads the archive (md5-checked) when none is there
    and ``download`` is true.

    Args:
        name: ``cifar10`` or ``cifar100``.
        data_dir: Where the copy is (or is downloaded to).
        batch_size, num_workers, seed, pin_memory: See :class:`BBBDataModule`.
        val_size: Training images held out for validation, ``>= 1``.
        augment: Random crop and horizontal flip of the training images.
        crop_padding: Pixels of padding around a training image before its random crop.
        download: Download the archive in :meth:`prepare_data` when no copy is found.
        limit_train: Keep only the first ``limit_train`` training examples; ``None``: all.
    """

    task = "classification"
    input_shape = (3, 32, 32)

    def __init__(
        self,
        name: str = "cifar10",
        data_dir: str | Path = "data/CIFAR10",
        batch_size: int = 128,
        val_size: int = 5000,
        augment: bool = True,
        crop_padding: int = 4,
        download: bool = True,
        limit_train: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        if name not in CIFAR_SETS:
            raise ValueError(f"dataset name must be one of {', '.join(CIFAR_SETS)}, got {name!r}")
        for key, value in (("augment", augment), ("download", download)):
            if not isinstance(value, bool):
                raise ValueError(f"dataset {key} must be true or false, got {value!r}")
        self.spec: CifarSet = CIFAR_SETS[name]
        self.name = name
        self.num_classes = self.spec.num_classes
        self.data_dir = Path(data_dir)
        self.val_size = _check_int("val_size", val_size, minimum=1)
        self.augment = augment
        self.crop_padding = _check_int("crop_padding", crop_padding, minimum=0)
        self.download = download
        self.limit_train = (
            None if limit_train is None else _check_int("limit_train", limit_train, 1)
        )
        self.classes: list[str] | None = None
        self.channel_mean: list[float] | None = None
        self.channel_std: list[float] | None = None
        self._train_images: Tensor | None = None
        self._train_labels: Tensor | None = None

    def prepare_data(self) -> None:
        """Download the archive into ``data_dir`` when no copy is there and ``download`` is set.

        Raises:
            FileNotFoundError: No copy, and ``download`` is false or the download failed.
        """
        if find_copy(self.data_dir, self.spec) is not None:
            return
        if not self.download:
            raise FileNotFoundError(self._missing_message("download=False"))
        try:
            download_archive(self.data_dir, self.spec)
        except OSError as err:
            raise FileNotFoundError(self._missing_message(f"download failed: {err}")) from None

    def setup(self, stage: str | None = None) -> None:
        """Decode the batches (once; later calls return at once), split and normalise them."""
        if self.test_set is not None:
            return
        copy = find_copy(self.data_dir, self.spec)
        if copy is None:
            hint = "run prepare_data() to download it" if self.download else "download=False"
            raise FileNotFoundError(self._missing_message(hint))
        train_x, train_y = read_batches(copy, self.spec, self.spec.train)
        test_x, test_y = read_batches(copy, self.spec, self.spec.test)
        if self.val_size >= len(train_x):
            raise ValueError(
                f"dataset val_size must be < {len(train_x)} (the training images in {copy}), "
                f"got {self.val_size}"
            )
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        self.channel_mean, self.channel_std = channel_moments(train_x[train_idx])
        if self.limit_train is not None:
            train_idx = train_idx[: self.limit_train]
        self._train_images, self._train_labels = train_x[train_idx], train_y[train_idx]
        self.train_set = (
            self._augmented(epoch=0)
            if self.augment
            else TensorDataset(self.normalize(self._train_images), self._train_labels)
        )
        self.val_set = TensorDataset(self.normalize(train_x[val_idx]), train_y[val_idx])
        self.test_set = TensorDataset(self.normalize(test_x), test_y)
        self.classes = read_class_names(copy, self.spec)

    def normalize(self, images: Tensor) -> Tensor:
        """``uint8 (N, 3, 32, 32)`` pixels to ``float32``, ``(pixels - mean_c) / std_c``."""
        if self.channel_mean is None or self.channel_std is None:
            raise RuntimeError("CIFARDataModule.normalize needs setup() first")
        mean = torch.tensor(self.channel_mean).reshape(1, -1, 1, 1)
        std = torch.tensor(self.channel_std).reshape(1, -1, 1, 1)
        return ((images.float() - mean) / std).float()

    def train_dataloader(self):
        """As :meth:`BBBDataModule.train_dataloader`, over this epoch's crops and flips."""
        if self.augment and self._train_images is not None:
            trainer = self.trainer
            self.train_set = self._augmented(trainer.current_epoch if trainer is not None else 0)
        return super().train_dataloader()

    def _augmented(self, epoch: int) -> RandomCropFlip:
        assert self._train_images is not None and self._train_labels is not None
        return RandomCropFlip(
            self._train_images,
            self._train_labels,
            torch.tensor(self.channel_mean),
            torch.tensor(self.channel_std),
            self.crop_padding,
            self.seed,
            epoch,
        )

    def _missing_message(self, reason: str) -> str:
        return (
            f"{self.spec.title} not found in {self.data_dir}: expected "
            f"{self.spec.layouts(self.data_dir)}; {reason}. Set dataset.data_dir=... "
            "(evaluate: data_dir=...) to a local copy"
        )
