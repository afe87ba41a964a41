"""Hugging Face transformers checkpoints in and out, exact or refused.

- :mod:`.families`: one adapter per family (Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, and the dense Qwen2 / Qwen3
  imported for upcycling), each owning its config mapping, tensor names, refusals and special cases;
- :mod:`.adapter`: what an adapter provides and the mapping all families share;
- :mod:`.driver`: export and import of a model through an adapter (names no family);
- :mod:`.checkpoints`: training checkpoints to HF directories and HF directories to ``model.yaml`` +
  ``model.ckpt`` (``sdmoe-train export`` / ``import``);
- :mod:`.files`: config.json, sharded safetensors and tokenizer files; :mod:`.upcycle`: sparse upcycling;
  :mod:`.aux_loss`: the load-balancing coefficient conversion.

``transformers`` itself is never imported: only ``safetensors`` is needed.
"""
