"""Data for a recipe: load a source (``sources.py``), mix sources and hold out evaluation rows (``mixture.py``),
tokenize them for the task (``tokenization.py``; data formats: ``formats.py``; conversations and their loss masks:
``chat.py``; class labels against the checkpoint's head: ``labels.py``), collate (``collate.py``)."""

from .chat import with_chat_template
from .collate import make_collator
from .formats import PAIR_TASKS, data_format
from .labels import MAX_CLASSES, checkpoint_head, encode_labels, set_label_config
from .mixture import Sources, load_sources
from .sources import FILE_BUILDERS, load_source, require_columns
from .tokenization import SFT_TEMPLATE, task_columns, tokenize

__all__ = [
    "FILE_BUILDERS", "MAX_CLASSES", "PAIR_TASKS", "SFT_TEMPLATE", "checkpoint_head", "data_format", "encode_labels",
    "load_source", "load_sources", "make_collator", "require_columns", "set_label_config", "Sources", "task_columns",
    "tokenize", "with_chat_template",
]  # fmt: skip
