"""The single decoder-only transformer built from ``moe/`` blocks (pure PyTorch, no Lightning or distributed code)."""
