"""sdsweep.results.table."""
