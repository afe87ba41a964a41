"""Conversion to and from other projects' checkpoint formats (today: Hugging Face transformers, :mod:`.hf`)."""
