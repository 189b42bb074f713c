"""LightningDataModules sharing the :class:`BBBDataModule` interface."""

from bbb_lightning.data.base import BBBDataModule
from bbb_lightning.data.cifar import CIFARDataModule
from bbb_lightning.data.csv import CSVDataModule
from bbb_lightning.data.mnist import MNISTDataModule
from bbb_lightning.data.toy_regression import ToyRegressionDataModule
from bbb_lightning.data.uci import UCIDataModule

__all__ = [
    "BBBDataModule",
    "CIFARDataModule",
    "CSVDataModule",
    "MNISTDataModule",
    "ToyRegressionDataModule",
    "UCIDataModule",
]
