"""Training: the loop, optimisation schedule, checkpoints and run-folder records."""
