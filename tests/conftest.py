"""Shared fixtures: offline environment, composed configs and tiny models built once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _session_cache() -> Path:
    """One fresh model cache per test run. Under pytest-xdist (`make test` runs two worker processes) the
    controller loads this file first and the workers inherit its folder, so each model is built once per
    run (the build takes a lock), and the controller removes the folder when the run ends."""
    inherited = os.environ.get("SDSWEEP_TEST_SESSION_CACHE")
    if inherited and os.environ.get("PYTEST_XDIST_WORKER"):
        return Path(inherited)
    folder = Path(tempfile.mkdtemp(prefix="sdsweep-test-cache-"))
    os.environ["SDSWEEP_TEST_SESSION_CACHE"] = str(folder)
    return folder


def _split_cores_between_workers() -> None:
    """Under xdist, each worker's torch gets its share of the cores (set before torch is imported; its
    subprocesses inherit it). Two workers with two threads each on 2 cores ran the shapes study about 3x
    slower: a process with more threads than it gets cores waits on its own stalled threads (the shapes
    build measured 7x). An OMP_NUM_THREADS the user exported wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


_split_cores_between_workers()
# Set before anything imports huggingface_hub / wandb: tests never touch the network.
_SESSION_CACHE = _session_cache()
os.environ.setdefault("SDSWEEP_CACHE", str(_SESSION_CACHE))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    """The session's model cache goes with the session (a fresh build each run; 250 runs once left 3 GB).
    Under xdist the controller removes it, after every worker has finished with it."""
    is_xdist_worker = hasattr(session.config, "workerinput")
    if os.environ.get("SDSWEEP_CACHE") == str(_SESSION_CACHE) and not is_xdist_worker:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# The files that take longest, measured (`make test` prints the 30 slowest tests), in that order. With two
# xdist workers taking a file at a time, a long file started last would run alone at the end of the run.
SLOWEST_FILES_FIRST = (
    "test_shapes.py",
    "test_parallel.py",
    "test_slurm.py",
    "test_readme_commands.py",
    "test_integrity.py",
    "test_sdxl.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def compose(overrides: list[str] | None = None, typed: bool = True):
    """Compose the real conf/ exactly as the CLI does; returns the validated Config dataclass."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sdsweep.config.load import to_typed
    from sdsweep.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_typed(raw) if typed else raw


# The smallest config that runs every stage: tiny model, demo data, cheap evaluation, no W&B.
TINY_OVERRIDES = [
    "model=tiny",
    "data=demo",
    "eval=tiny",
    "tracking=none",
    "train.max_train_steps=4",
    "train.train_batch_size=2",
    "eval.num_images_per_prompt=1",
    "eval.num_inference_steps=2",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A fresh tiny config writing under tmp_path."""
    return compose(TINY_OVERRIDES + [f"paths.root={tmp_path / 'experiments'}"])


@pytest.fixture(scope="session")
def tiny_model_dirs():
    from sdsweep.models import tiny

    return {flavour: tiny.ensure_tiny_model(flavour) for flavour in tiny.FLAVOURS}


@pytest.fixture(scope="session")
def demo_data_dir():
    from sdsweep.models import tiny

    return tiny.ensure_demo_dataset()


@pytest.fixture(scope="session")
def tiny_clip_dir():
    from sdsweep.models import tiny

    return tiny.ensure_tiny_clip()


# A finished tiny study (2 learning rates x 2 step counts, full fine-tune), run once per session
# through the real sweep driver. Report, export and generate tests read it.
FINISHED_STUDY_OVERRIDES = TINY_OVERRIDES + [
    "+sweep=lr_steps",
    "sweep.learning_rates=[1e-4,1e-2]",
    "sweep.steps=[2,4]",
    "sweep.isolation=inprocess",
    "sweep.keep_best_k=-1",
    "tracking=wandb",
    "study=finished",
]


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory):
    from sdsweep.sweep.driver import run_sweep

    root = tmp_path_factory.mktemp("finished-study")
    outcome = run_sweep(FINISHED_STUDY_OVERRIDES + [f"paths.root={root}"])
    assert outcome.finished
    return outcome.study_dir


# ---- parallel sweeps: a real PostgreSQL server and real driver processes ---------------------------------
@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on a free local port for the whole session (tests/pg.py)."""
    from pg import PostgresServer, missing_reason

    reason = missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
        pytest.skip(reason)
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh empty database per test; its SQLAlchemy URL (postgresql+psycopg://...)."""
    import uuid

    name = f"t_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture
def drivers(tmp_path):
    """Start ``python -m sdsweep`` drivers; every process they spawned is killed at teardown."""
    from drivers import DriverGroup

    group = DriverGroup(tmp_path / "driver-logs")
    try:
        yield group
    finally:
        group.kill_all()
