"""Lightning callbacks that show why Adai behaves as it does: inertia, sharpness, saddle escape."""

from adai_lightning.callbacks.hessian_sharpness import HessianSharpness
from adai_lightning.callbacks.inertia import InertiaMonitor
from adai_lightning.callbacks.saddle_escape import SaddleEscapeMonitor

__all__ = ["HessianSharpness", "InertiaMonitor", "SaddleEscapeMonitor"]
