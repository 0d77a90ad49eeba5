"""sdsweep.data.images."""
