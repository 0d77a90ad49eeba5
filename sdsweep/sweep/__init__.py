"""sdsweep.sweep.engine."""
