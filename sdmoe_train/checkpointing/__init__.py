"""Everything about saving and resuming a run, in one place.

- :mod:`.manifest`: ``manifest.json`` (sizes, SHA-256) of a checkpoint directory, pruning, verification;
- :mod:`.periodic`: :class:`~.periodic.PeriodicCheckpoint`, crash-safe periodic saves with per-rank RNG states;
- :mod:`.resume`: which checkpoint ``fit`` continues from (explicit and verified, or the newest valid one);
- :mod:`.run_identity`: what a checkpoint must share with the run resuming it;
- :mod:`.model_state`: where a checkpoint keeps the transformer's weights;
- :mod:`.preemption`, :mod:`.slurm`: the callback that turns preemption signals (held as flags by
  :mod:`sdmoe_train.signals`) into a save, a stop and a requeue, and the Slurm requeue with its release job;
- :mod:`.wandb_run_id`: a resumed or requeued run logs to the same W&B run;
- :mod:`.consolidate`: per-rank expert-parallel checkpoints joined into one file.

Atomic file writes themselves live one layer down, in :mod:`sdmoe_train.io`. The callbacks here are
re-exported by :mod:`sdmoe_train.lightning.callbacks`, the namespace recipes name them by.
"""
