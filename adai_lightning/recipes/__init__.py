"""Models and data modules used by the recipes in ``recipes/*.yaml``."""

from adai_lightning.recipes.classifier import ImageClassifier, SmallConvNet
from adai_lightning.recipes.digits import DigitsDataModule
from adai_lightning.recipes.gpt import GPTLanguageModel
from adai_lightning.recipes.text_data import StdlibTextDataModule

__all__ = ["DigitsDataModule", "GPTLanguageModel", "ImageClassifier", "SmallConvNet", "StdlibTextDataModule"]
