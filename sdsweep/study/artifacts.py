"""Trial grids in Optuna's artifact store, so optuna-dashboard shows each trial's images on its page.

The store is a ``FileSystemArtifactStore`` in ``<study>/artifacts`` by default; ``sweep.artifact_dir`` names
one shared location instead (a study on shared storage whose workers do not share the study folder). An
upload is skipped when the trial (or, for the baseline, the study) already holds an artifact of that file
name, so a resumed or taken-over trial does not upload its grid twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARTIFACT_DIR = "artifacts"
BASELINE_GRID = "baseline_grid.png"


def artifact_dir(study_root: Path, configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else Path(study_root) / ARTIFACT_DIR


def upload_once(
    store_dir: Path, file_path: Path, study_or_trial: Any, storage: Any, name: str | None = None
) -> str | None:
    """Upload ``file_path`` (as ``name``) unless an artifact of that name is already attached; its id or None."""
    import shutil
    import tempfile

    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

    name = name or Path(file_path).name
    if not Path(file_path).is_file():
        return None
    if any(meta.filename == name for meta in get_all_artifact_meta(study_or_trial, storage=storage)):
        return None
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    with tempfile.TemporaryDirectory() as folder:  # the artifact's file name is the uploaded file's
        named = Path(folder) / name
        shutil.copyfile(file_path, named)
        return upload_artifact(
            artifact_store=store,
            file_path=str(named),
            study_or_trial=study_or_trial,
            storage=storage,
            mimetype="image/png",
        )
