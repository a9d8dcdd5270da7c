"""Run-time services used by the core and the techniques: checkpoints, distributed launch, metrics and the run
report, logging. Nothing here imports the core, so the core can use all of it."""
