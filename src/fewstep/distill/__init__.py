"""Distillation objectives, one module per paper: `dparallel` (certainty forcing), `cd4lm` (DSCD)."""
