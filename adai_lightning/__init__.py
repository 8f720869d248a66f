"""adai-lightning: the Adai optimizer (Adaptive Inertia) for PyTorch and PyTorch Lightning."""

from adai_lightning.optim import Adai, AdaiW

__version__ = "0.1.0"
__all__ = ["Adai", "AdaiW", "__version__"]
