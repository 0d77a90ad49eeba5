"""Running a sweep: the driver (driver), the work loop (engine) with its claimers (claimer, grid_claims,
search), claims and heartbeats (claims) and wake file (wake), the worker pool (pool, worker, preload), one
run (run_executor with run_setup, run_config, recorder, baseline), preflight checks (preflight,
search_space), the study fingerprint, and W&B tracking.
"""
