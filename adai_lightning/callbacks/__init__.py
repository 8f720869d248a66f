"""Lightning callbacks that show why Adai behaves as it does: inertia, sharpness, saddle escape."""

from adai_lightning.callbacks.inertia import InertiaMonitor

__all__ = ["InertiaMonitor"]
