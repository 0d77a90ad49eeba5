"""sdsweep.training."""
