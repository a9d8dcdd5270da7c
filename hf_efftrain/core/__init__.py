"""The core: recipe schema, technique contract and registry, recipe -> model/data/Trainer (``build``),
``EffTrainer`` and ``train()``. See docs/ARCHITECTURE.md for how the pieces fit."""
