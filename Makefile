# sdsweep — run `make help` for the list of targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offline by default: the demo and tests never reach a model hub.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false

STUDY ?= demo
ARGS ?=

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install sdsweep with dev tools
	@echo "venv ready: $(VENV)"

# SHAPES_SEED=N runs the demo on the shapes build of seed N (another model of the same world, built once):
# model and CLIP shapes:sd15@seedN, study demo-seedN. 0 is the default build and the plain `make demo`.
SHAPES_SEED ?= 0
DEMO_STUDY := $(if $(filter 0,$(SHAPES_SEED)),demo,demo-seed$(SHAPES_SEED))
DEMO_BUILD := $(if $(filter 0,$(SHAPES_SEED)),,model.pretrained=shapes:sd15@seed$(SHAPES_SEED) eval.clip_model=shapes:sd15@seed$(SHAPES_SEED) study=$(DEMO_STUDY))
demo: $(STAMP) ## lr x steps grid teaching the shapes model a star it never saw (CPU; the first run builds it, minutes; SHAPES_SEED=N: build N)
	$(PY) -m sdsweep.models.shapes_build --seed $(SHAPES_SEED)
	$(PY) -m sdsweep +experiment=demo $(DEMO_BUILD) $(ARGS)
	$(PY) -m sdsweep.confirm experiments/$(DEMO_STUDY)
	$(PY) -m sdsweep.report experiments/$(DEMO_STUDY)

demo-tiny: $(STAMP) ## The same machinery on the random-weight tiny model (CPU, about a minute; images are noise)
	$(PY) -m sdsweep +experiment=demo_tiny $(ARGS)
	$(PY) -m sdsweep.report experiments/demo_tiny

demo-methods: $(STAMP) ## Offline full/DreamBooth/TI/LoRA x v1.5/v2.1/SDXL-flavoured comparison (CPU, minutes)
	$(PY) -m sdsweep.models.shapes_build
	$(PY) -m sdsweep +experiment=demo_methods $(ARGS)
	$(PY) -m sdsweep.report experiments/demo_methods

sweep: $(STAMP) ## Run a sweep: make sweep ARGS="+sweep=lr_steps model=sd15 data=imagefolder data.path=..."
	$(PY) -m sdsweep $(ARGS)

# N workers on one study: one driver with sweep.workers=N (a persistent worker per slot; on CPU they
# split the cores). Run the same line on other machines with a shared sweep.storage to join the study.
N ?= 2
workers: $(STAMP) ## N local workers on one study: make workers N=4 ARGS="+experiment=demo_tiny" (one driver, sweep.workers=N)
	$(PY) -m sdsweep $(ARGS) sweep.workers=$(N)

# A SLURM job array of scripts/slurm/sdsweep_array.sbatch for the study, sized from its plan (needs
# SDSWEEP_STORAGE): make submit ARGS="--tasks 4 --gpus-per-task=1 -- study=dog +sweep=lr_steps model=sd15"
submit: $(STAMP) ## Submit the study as a SLURM array: make submit ARGS="--tasks N [sbatch options] -- <overrides>"
	$(PY) -m sdsweep.submit $(ARGS)

# Two pytest-xdist worker processes, a test file each at a time (--dist loadfile keeps a file's session
# fixtures, such as the shapes demo study, in one worker); the slowest files start first (tests/conftest.py
# orders them; --no-loadscope-reorder keeps that order instead of xdist's most-tests-first).
# Many tests wait on subprocesses, servers and signals, so two workers overlap that waiting on 2 cores.
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(STAMP) browser ## Run the test suite (tiny models, offline; TEST_WORKERS=0: in one process)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 $(ARGS)

# System packages the tests use, from Debian; best effort, so a machine without apt still runs the rest:
# chromium renders report.html (that one test skips without it); postgresql's server binaries
# (initdb, pg_ctl) back the parallel-sweep tests' throwaway PostgreSQL cluster (they skip without it);
# slurm-wlm and munge run the SLURM tests' one-node cluster (tests/SLURM.md; they skip without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the report render test"; \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
	  echo "chromium could not be installed; the render test will be skipped"; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian postgresql for the shared-storage tests"; \
	  (apt-get install -y -qq postgresql >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1)) || \
	  echo "postgresql could not be installed; the PostgreSQL tests will be skipped"; }
	@command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 || { \
	  echo "installing Debian slurm-wlm and munge for the one-node SLURM cluster tests"; \
	  (apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1)) || \
	  echo "slurm-wlm could not be installed; the SLURM tests will be skipped"; }

test-fast: $(STAMP) ## Run the tests not marked slow
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP) ## Ruff lint and format check
	$(PY) -m ruff check sdsweep bench tests
	$(PY) -m ruff format --check sdsweep bench tests

bench: $(STAMP) ## Benchmark sweep cost, step overhead and eval speed; writes bench/results.json
	$(PY) -m bench --out bench/results.json $(ARGS)

# Not part of `make test`: the demo on every build x eval seed set (minutes each; the builds take minutes once).
# DEEP=N: the pick's and the untuned model's ground truth counted again on N fresh images per prompt, so a
# pick near the drift guard's line is decided by the truth, not left within its noise (0: the study's own).
BUILDS ?= 0,1,2,3
EVAL_SEEDS ?= 1234,4321
DEEP ?= 64
validate: $(STAMP) ## Does the demo's pick hold across shapes builds and eval seeds? bench/validate.md (BUILDS=0,1,2,3 EVAL_SEEDS=1234,4321 DEEP=64)
	$(PY) -m bench.validate --builds $(BUILDS) --eval-seeds $(EVAL_SEEDS) --deep $(DEEP) --root experiments/validate --out bench/validate.json $(ARGS)

report: $(STAMP) ## Build the HTML/markdown report: make report STUDY=demo
	$(PY) -m sdsweep.report experiments/$(STUDY)

export: $(STAMP) ## Export the best trial: make export STUDY=demo TO=exported/demo
	$(PY) -m sdsweep.export experiments/$(STUDY) --to $(or $(TO),exported/$(STUDY))

# Optuna's web dashboard over a study's storage (the `dashboard` extra: pip install -e '.[dashboard]').
# STORAGE overrides the default SQLite file, e.g. STORAGE=postgresql+psycopg://user@host/optuna for a
# study run with sweep.storage=...; PORT picks the port (default 8080); open http://127.0.0.1:$(PORT)/.
# ARTIFACTS: the trial grids' artifact store (default: artifacts/ beside the SQLite study.db, else
# experiments/$(STUDY)/artifacts; a study run with sweep.artifact_dir=... passes that folder).
PORT ?= 8080
dashboard: $(STAMP) ## Optuna dashboard on a study: make dashboard STUDY=demo [STORAGE=...] [ARTIFACTS=dir] [PORT=8080]
	@storage='$(or $(STORAGE),sqlite:///experiments/$(STUDY)/study.db)'; \
	case "$$storage" in sqlite:///*) test -f "$${storage#sqlite:///}" || \
	  { echo "no study storage at $${storage#sqlite:///}: run the study first (make demo), or pass STORAGE=..."; exit 2; };; esac; \
	echo "optuna-dashboard on http://127.0.0.1:$(PORT)/ (Ctrl-C stops it)"; \
	artifacts='$(ARTIFACTS)'; test -n "$$artifacts" || case "$$storage" in \
	  sqlite:///*) artifacts="$$(dirname "$${storage#sqlite:///}")/artifacts";; *) artifacts="experiments/$(STUDY)/artifacts";; esac; \
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port $(PORT) --artifact-dir "$$artifacts" "$$storage"

clean: ## Remove caches and build outputs (keeps experiments/ and .venv)
	rm -rf .pytest_cache .ruff_cache build *.egg-info outputs multirun
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

distclean: clean ## Also remove .venv
	rm -rf $(VENV)

.PHONY: help setup browser demo demo-tiny demo-methods sweep workers test test-fast lint bench validate report export dashboard clean distclean
