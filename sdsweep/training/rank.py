"""``python -m sdsweep.training.rank SPEC.json``: rank 1..N-1 of a data-parallel run (see distributed.py).

Reads the run's config from the spec (built once when the run was claimed; no Hydra here), builds the same
model, method and training set as rank 0 (``setup.build_training``), then trains: no evaluation, no files
written, no Optuna or W&B. Exits non-zero with the error on its last line when anything fails.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from sdsweep import signals
    from sdsweep.training.process_group import RankSpec, joined

    signals.watch_parent()  # fallback for PR_SET_PDEATHSIG, set by rank 0 when it started us
    spec = RankSpec.from_json(Path(argv[0]).read_text())
    from sdsweep import faults, io, progress, warnings_filter
    from sdsweep.config.load import config_from_yaml
    from sdsweep.data.examples import load_examples, split_examples
    from sdsweep.models.loading import select_device
    from sdsweep.training.setup import build_training
    from sdsweep.training.train import TrainingDiverged, train

    warnings_filter.install()
    progress.quiet_library_bars()
    with joined(spec.rank, spec.world_size, spec.port, spec.threads, spec.cuda):
        cfg = config_from_yaml(spec.config)
        device = select_device(cfg.device)
        train_examples, _ = split_examples(load_examples(cfg), cfg.data.num_heldout)
        training = build_training(cfg, io.StudyPaths(Path(spec.study_root)).cache, device, train_examples)
        if faults.fault("rank_crash"):  # tests: a rank dies mid-run
            raise RuntimeError("injected fault: this rank crashed")
        checkpoint_dir = Path(spec.checkpoint_dir) if spec.checkpoint_dir else None
        try:
            train(cfg, training.method, training.dataset, spec.milestones, checkpoint_dir=checkpoint_dir)
        except TrainingDiverged:
            return 0  # every rank sees the same global loss: rank 0 records the divergence
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
