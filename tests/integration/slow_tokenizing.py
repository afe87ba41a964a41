"""`sdmoe-train` whose tokenizing takes ten minutes per batch, for tests that signal a run while it prepares data.

``SLOW_TOKENIZING_DIR=DIR python -m tests.integration.slow_tokenizing fit|prepare ...``: each tokenizing process
(the main one, or each of ``data.corpus.num_proc`` workers) first touches ``DIR/<its pid>``, so a test knows
when they all work. The directory comes from the environment so that DDP ranks started from this script's
command line see it too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sdmoe_train.cli import main
from sdmoe_train.data import cache
from sdmoe_train.data.tokenizer import encode_documents

SLOW_BATCH_SECONDS = 600


def slow_encode_batch(batch: dict, tokenizer: object, eos_id: int) -> dict:
    Path(os.environ["SLOW_TOKENIZING_DIR"], str(os.getpid())).touch()
    time.sleep(SLOW_BATCH_SECONDS)
    return {"input_ids": encode_documents(tokenizer, batch["text"], eos_id)}


if __name__ == "__main__":
    cache._encode_batch = slow_encode_batch
    main()
