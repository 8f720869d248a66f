"""Models and data modules used by the recipes in ``recipes/*.yaml``."""

from adai_lightning.recipes.classifier import ImageClassifier, SmallConvNet
from adai_lightning.recipes.digits import DigitsDataModule

__all__ = ["DigitsDataModule", "ImageClassifier", "SmallConvNet"]
