"""LightningDataModules for fine-grained classification.

* :class:`FineGrainedDataModule` -- the base: transforms and loaders.
* :class:`CUB200DataModule`, :class:`FGVCAircraftDataModule`, :class:`StanfordCarsDataModule` --
  the three benchmarks in the layouts users have.
* :class:`CSVDataModule` -- ``path,label`` lists.
* :class:`ImageFolderDataModule` -- your own ``root/{train,val,test}/<class>/<image>`` folders.
* :class:`FashionMNISTDataModule` -- the embedded default (real images that install offline).

Data knows no model: nothing here imports ``finegrained.model`` or ``finegrained.heads``.
"""
from datamodules.aircraft import FGVCAircraftDataModule
from datamodules.base import FineGrainedDataModule
from datamodules.cars import StanfordCarsDataModule
from datamodules.csv_list import CSVDataModule
from datamodules.cub import CUB200DataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.folder import ImageFolderDataModule
from datamodules.io import ImageLoadError, load_rgb

__all__ = ["FineGrainedDataModule", "CUB200DataModule", "FGVCAircraftDataModule", "StanfordCarsDataModule",
           "CSVDataModule", "ImageFolderDataModule", "FashionMNISTDataModule", "ImageLoadError", "load_rgb"]
