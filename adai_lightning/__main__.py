"""``python -m adai_lightning`` is the ``adai-lightning`` console script."""

from adai_lightning.cli import main

main()
