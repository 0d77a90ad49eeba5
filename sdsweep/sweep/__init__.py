"""Running a sweep: the driver (driver), the claim/run loop (engine) with its claims and heartbeats (claims),
the worker pool (pool, worker, preload), one run (run_executor with run_setup, run_config, recorder,
baseline), the DDP rank entry (rank), preflight checks, the study fingerprint, and W&B tracking.
"""
