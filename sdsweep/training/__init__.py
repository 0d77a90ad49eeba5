"""Training one run: the loop (train) with its batches, checkpoints, schedule, caption dropout and optimizers,
the pure loss (loss), what it needs built once (setup), data parallelism (distributed starts the ranks,
process_group is a rank's membership, rank the child ranks' entry), memory prediction (memory, memory_trace), and the
fine-tuning methods (methods/). Never imports wandb or optuna.
"""
