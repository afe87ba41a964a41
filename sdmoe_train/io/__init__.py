"""Crash-safe file output shared by checkpoints, manifests, tokenizers and exports."""

from sdmoe_train.io.atomic import (
    atomic_path,
    copy_file_atomically,
    file_sha256,
    fsync_path,
    publish,
    write_json_atomically,
    write_text_atomically,
)

__all__ = [
    "atomic_path",
    "copy_file_atomically",
    "file_sha256",
    "fsync_path",
    "publish",
    "write_json_atomically",
    "write_text_atomically",
]
