"""Training one run: the loop (train) with its batches, checkpoints, schedule, caption dropout and optimizers,
the pure loss (loss), data parallelism (distributed), memory prediction (memory, memory_trace), and the
fine-tuning methods (methods/). Never imports wandb or optuna.
"""
