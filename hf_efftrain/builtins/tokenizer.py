"""The built-in tokenizer: a byte-level BPE trained offline on ``builtin:stdlib-docs`` (docs/ARCHITECTURE.md, "Offline
built-ins"), saved with ``save_pretrained`` under ``cache_dir(CACHE_KEY)`` and loaded like any local tokenizer.

It adds no special tokens by itself (no BOS/EOS post-processor): the data code adds them where a task needs them.
The 32 ``<extra_id_N>`` sentinels are there for T5-style span corruption. Its chat template is ChatML (each turn
is ``<|im_start|>``, the role, a newline, the content, ``<|im_end|>`` and a newline: the format of Qwen 2.5 and
SmolLM; the two markers are single special tokens) with ``{% generation %}`` markers around each assistant answer,
which transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` turns into the assistant mask.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..cache import cache_dir, cached_dir
from .chat_templates import CHATML_TEMPLATE
from .data import load_builtin_dataset

logger = logging.getLogger(__name__)

VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 2048
NUM_SENTINELS = 32
NAMED_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "cls_token": "<cls>",
    "sep_token": "<sep>",
}
SENTINELS = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CACHE_KEY = "tokenizer-v2"  # v2: the ChatML tokens and chat template


def _train(folder: Path) -> None:
    start = time.perf_counter()
    texts = list(load_builtin_dataset("stdlib-docs")["train"]["text"])
    backend = Tokenizer(models.BPE(unk_token=NAMED_SPECIAL_TOKENS["unk_token"]))
    # GPT-2 style byte level: every string is representable, and decode(encode(s)) == s
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # offsets only: this post-processor adds no tokens (no automatic BOS/EOS)
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        # listed first so they get the ids 0.. (pad = 0), and count toward the 4096
        special_tokens=[*NAMED_SPECIAL_TOKENS.values(), *SENTINELS, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # would change text on decode ("a ." -> "a.")
        extra_special_tokens=SENTINELS + CHAT_TOKENS,
        chat_template=CHATML_TEMPLATE,
        **NAMED_SPECIAL_TOKENS,
    )
    tokenizer.save_pretrained(str(folder))
    logger.info("trained the builtin tokenizer (%d tokens) in %.1fs", len(tokenizer), time.perf_counter() - start)


@functools.lru_cache(maxsize=4)
def _load(folder: str) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(folder)


def get_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in byte-level BPE tokenizer (vocab 4096), trained on first use and cached on disk and in-process.

    The in-process cache hands every caller the same object: ``copy.deepcopy`` it before changing its settings.
    """
    folder = cached_dir(cache_dir(CACHE_KEY), _train)
    return _load(str(folder))  # keyed by folder, so a different HF_EFFTRAIN_CACHE gets its own tokenizer
