"""``make bench``: what sdsweep's design buys, measured side by side (GitHub issues #7 and #11).

Outside the ``sdsweep`` package: it measures the product through its public entry points. Entry first;
imports point down this list, never up:

- ``run`` (and ``__main__``): the ``python -m bench`` command: which sections, machine facts, verdicts,
  ``results.json``, the printed table.
- The sections, one module each, each with a ``run(...) -> dict``:
  ``sweep_cost`` (1), ``step`` (2), ``evaluation`` (3), ``gpu`` (4), ``parallel`` (5; also
  ``python -m bench.parallel``).
- ``sweeps``: the tiny sweep, its arms and the timed sweep through the real driver (wall, CPU and
  evaluation seconds), shared by the sections that run sweeps (1 and 5).
- ``section`` (a failing section is recorded, not fatal), ``verdicts`` (targets), ``table`` (the printed
  table), ``machine`` (what the numbers were measured on).
"""

import os

# Offline before anything imports huggingface_hub or wandb: the bench never touches a network. Set here,
# on the package, so that every entry (python -m bench, -m bench.parallel, -m bench.gpu, the test) gets it.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(_key, _value)
