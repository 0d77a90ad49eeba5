"""Imported once by the worker pool's fork server, so that each worker forked from it starts warm.

Only imports: nothing here may start threads, touch CUDA or open files, because every worker is a fork
of the process that ran it. A library that fails to import is simply left for the worker to import (and
report) itself.
"""

from sdsweep import progress, warnings_filter

warnings_filter.install()  # the fork server shares the driver's terminal: no torchvision advice there
progress.quiet_library_bars()

import gc  # noqa: E402

import accelerate  # noqa: E402, F401
import optuna  # noqa: E402
import torch  # noqa: E402, F401
import torchmetrics  # noqa: E402, F401
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402, F401
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402, F401

import sdsweep.sweep.engine  # noqa: E402, F401
import sdsweep.sweep.run_executor  # noqa: E402, F401
import sdsweep.sweep.worker  # noqa: E402, F401

# A process's first RDBStorage imports SQLAlchemy's ORM and alembic and builds Optuna's schema: 0.35 s
# (later ones: 0.02 s), which every worker paid on its way to its first claim, the serial start of a pool.
# An in-memory SQLite database opens no file, so the fork server pays it once for all of them.
optuna.storages.RDBStorage("sqlite:///:memory:").engine.dispose()

# Everything imported above lives as long as the process: keep it out of the cyclic garbage collector, so
# each collection (one per run, sdsweep.sweep.run_setup.release_memory) scans only what a run allocated
# (0.3-0.4 s on 2 cores with these libraries loaded, about nothing once frozen), and forked workers do not
# touch, and so copy, the fork server's pages just to collect them.
gc.freeze()
