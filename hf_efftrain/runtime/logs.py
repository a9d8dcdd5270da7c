"""Logging for the CLI and the benchmark's worker processes: INFO on rank 0, silent on the other ranks."""

from __future__ import annotations

import logging
import os


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO if rank == 0 else 60)
    # bitsandbytes warns at import that its optional `kernels` package is missing; its CPU paths work without it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # With `kernels` installed (transformers 5.25 brings it), it warns that offline mode skips its hub trust check.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
