"""Adai optimizers in pure torch (no Lightning import)."""

from adai_lightning.optim.adai import Adai, AdaiW, Inertia

__all__ = ["Adai", "AdaiW", "Inertia"]
