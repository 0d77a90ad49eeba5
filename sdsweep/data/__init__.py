"""Training data: examples listed and verified (examples), pixels and the torch Dataset (images),
aspect-ratio buckets (buckets) and the VAE latent cache (latent_cache)."""
