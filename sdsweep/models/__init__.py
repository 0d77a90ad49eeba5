"""sdsweep.models.loading."""
