"""``hf-efftrain bench`` and ``hf-efftrain report``: variants side by side with the stock ``transformers.Trainer``."""
