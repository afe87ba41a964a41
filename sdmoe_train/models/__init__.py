"""Decoder-only MoE transformers (pure PyTorch, no Lightning or distributed code).

Import from the submodules (``models.config``, ``models.transformer``, ``models.presets``): ``moe/``
depends on ``models.config``, so this package must not import ``models.transformer`` eagerly.
"""
