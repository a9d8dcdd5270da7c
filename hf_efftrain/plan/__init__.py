"""``hf-efftrain plan``: per-device training memory predicted from a recipe or a parameter count, before any
weight is allocated (ZeRO accounting, Rajbhandari et al. 2020; activations, Korthikanti et al. 2022)."""
