"""Data for a recipe: load a source (``sources.py``), tokenize it for the task (``tokenization.py``), collate
(``collate.py``)."""

from .collate import make_collator
from .sources import FILE_BUILDERS, load_source, require_columns
from .tokenization import MAX_CLASSES, SFT_TEMPLATE, encode_labels, task_columns, tokenize

__all__ = [
    "FILE_BUILDERS", "MAX_CLASSES", "SFT_TEMPLATE", "encode_labels", "load_source", "make_collator",
    "require_columns", "task_columns", "tokenize",
]  # fmt: skip
