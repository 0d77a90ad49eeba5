"""sdsweep.config.schema."""
