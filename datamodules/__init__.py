"""LightningDataModules for fine-grained classification.

* :class:`FineGrainedDataModule` -- the base: transforms and loaders.
* :class:`ImageFolderDataModule` -- your own ``root/{train,val,test}/<class>/<image>`` folders.
* :class:`FashionMNISTDataModule` -- the embedded default (real images that install offline).

Data knows no model: nothing here imports ``finegrained.model`` or ``finegrained.heads``.
"""
from datamodules.base import FineGrainedDataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.folder import ImageFolderDataModule
from datamodules.io import ImageLoadError, load_rgb

__all__ = ["FineGrainedDataModule", "ImageFolderDataModule", "FashionMNISTDataModule",
           "ImageLoadError", "load_rgb"]
