"""``python -m sdmoe_train.cli ...``: the same as ``sdmoe-train ...`` (Slurm scripts launch it this way)."""

from sdmoe_train.cli import main

main()
