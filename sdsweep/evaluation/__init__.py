"""sdsweep.evaluation."""
