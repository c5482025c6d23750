"""LightningDataModules for fine-grained classification.

* :class:`FineGrainedDataModule` -- the base: transforms and loaders.
* :class:`CUB200DataModule`, :class:`FGVCAircraftDataModule`, :class:`StanfordCarsDataModule` --
  the three benchmarks in the layouts users have.
* :class:`NABirdsDataModule`, :class:`StanfordDogsDataModule`, :class:`Flowers102DataModule`,
  :class:`OxfordIIITPetDataModule`, :class:`Food101DataModule`, :class:`INaturalistDataModule` -- more
  fine-grained sets in their official layouts.
* :class:`HuggingFaceDataModule` -- Hugging Face ``datasets`` (``save_to_disk`` folders, parquet, the Hub).
* :class:`ShardDataModule` -- WebDataset shards written by ``finegrained data shard`` (several machines).
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
from datamodules.dogs import StanfordDogsDataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.flowers import Flowers102DataModule
from datamodules.folder import ImageFolderDataModule
from datamodules.food101 import Food101DataModule
from datamodules.huggingface import HuggingFaceDataModule
from datamodules.inaturalist import INaturalistDataModule
from datamodules.io import ImageLoadError, load_rgb
from datamodules.nabirds import NABirdsDataModule
from datamodules.pets import OxfordIIITPetDataModule
from datamodules.shards import ShardDataModule

__all__ = ["FineGrainedDataModule", "CUB200DataModule", "FGVCAircraftDataModule", "StanfordCarsDataModule",
           "NABirdsDataModule", "StanfordDogsDataModule", "Flowers102DataModule", "OxfordIIITPetDataModule",
           "Food101DataModule", "INaturalistDataModule", "HuggingFaceDataModule", "ShardDataModule",
           "CSVDataModule", "ImageFolderDataModule", "FashionMNISTDataModule", "ImageLoadError", "load_rgb"]
