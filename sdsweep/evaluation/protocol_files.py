"""File names of the held-out-captions protocol, shared by the evaluator (writer) and the report (reader).

Kept free of torch so the report can read them without importing the evaluator.
"""

HELDOUT_TABLE = "heldout.json"  # per-caption rows (caption, sample, truth, LPIPS) in a trial/baseline folder
HELDOUT_TRUTH = "heldout_truth"  # <study>/heldout_truth/h{i:03d}.png: the ground-truth photos, once per study


def truth_name(index: int) -> str:
    return f"h{index:03d}.png"
