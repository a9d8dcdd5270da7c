"""The data collator of each task: the stock transformers collators (techniques may wrap or replace them)."""

from __future__ import annotations

from typing import Any

from ...errors import RecipeError
from .formats import PAIR_TASKS
from .preference import PreferenceCollator


def make_collator(task: str, tokenizer, model: Any = None, mlm_probability: float = 0.15):
    """The stock transformers collator for each task (techniques may wrap or replace it)."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "masked_lm":
        if tokenizer.mask_token is None:
            raise RecipeError("model.tokenizer", "masked LM needs a tokenizer with a mask token")
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)
    if task == "classification":
        return DataCollatorWithPadding(tokenizer)
    # Pads input_ids/attention_mask with the pad id and labels with -100 (no loss on padding).
    pad = DataCollatorForSeq2Seq(tokenizer, model=model if task == "seq2seq" else None, label_pad_token_id=-100)
    return PreferenceCollator(pad) if task in PAIR_TASKS else pad
