"""Sweep constraints such as ``eval/appropriate_rate >= 0.75``.

Optuna's constrained samplers read a list of floats where <= 0 means satisfied, so each constraint
is turned into such a "violation" number; a missing metric counts as violated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sdsweep.errors import ConfigError

_PATTERN = re.compile(
    r"^\s*([A-Za-z0-9_/.\-]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*(x\s*baseline)?\s*$", re.IGNORECASE
)


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str
    threshold: float
    # ``eval/prior_clip_score >= 0.75x baseline``: the threshold is that multiple of the untuned model's
    # value, so the guard means the same with any CLIP (each CLIP has its own scale) and any model.
    relative: bool = False

    def bound(self, baseline: dict | None = None) -> float | None:
        """The threshold in the metric's units; None for a relative one without a baseline value."""
        if not self.relative:
            return self.threshold
        base = (baseline or {}).get(self.metric)
        if not isinstance(base, (int, float)) or not math.isfinite(base):
            return None
        return self.threshold * float(base)

    def violation(self, metrics: dict, baseline: dict | None = None) -> float:
        value = metrics.get(self.metric)
        bound = self.bound(baseline)
        if value is None or (isinstance(value, float) and math.isnan(value)) or bound is None:
            return 1.0
        if self.op in (">=", ">"):
            return bound - float(value) + (1e-12 if self.op == ">" else 0.0)
        return float(value) - bound + (1e-12 if self.op == "<" else 0.0)

    def satisfied(self, metrics: dict, baseline: dict | None = None) -> bool:
        return self.violation(metrics, baseline) <= 0

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}" + ("x baseline" if self.relative else "")


def parse_constraint(text: str) -> Constraint:
    match = _PATTERN.match(text)
    if not match:
        raise ConfigError(
            f"Invalid sweep constraint {text!r}: write it as '<metric> <op> <number>', "
            "e.g. 'eval/appropriate_rate >= 0.75' (op is one of >=, <=, >, <), or relative to the untuned "
            "model as '<metric> <op> <number>x baseline', e.g. 'eval/prior_clip_score >= 0.75x baseline'."
        )
    return Constraint(match.group(1), match.group(2), float(match.group(3)), bool(match.group(4)))


# ---- which eval/* metrics a study can compute ----------------------------------------------------------
def resolved_fid_features(fid_features: str) -> str:
    """``auto`` -> inception where torch-fidelity is installed, else clip (decided the same way as the evaluator)."""
    from sdsweep.config.features import torch_fidelity_available

    if fid_features != "auto":
        return fid_features
    return "inception" if torch_fidelity_available() else "clip"


def resolved_lpips_backbone(backbone: str) -> str:
    from sdsweep.config.features import torchvision_available

    if backbone != "auto":
        return backbone
    return "alex" if torchvision_available() else "clip"


def distance_keys(fid_features: str) -> tuple[str, str]:
    """(FID key, KID key): Inception features earn the names FID/KID; CLIP features are named for what they are."""
    if resolved_fid_features(fid_features) == "inception":
        return "eval/fid", "eval/kid"
    return "eval/fd_clip", "eval/kd_clip"


def computable_eval_keys(cfg) -> set[str]:
    """Every ``eval/*`` key this study's evaluation can produce, from the config alone (no model loads)."""
    from sdsweep.metric_names import lpips_key

    ev = cfg.eval
    fid_key, kid_key = distance_keys(ev.fid_features)
    keys: set[str] = set()
    for name in ev.metrics:
        if name == "fid":
            keys |= {fid_key, f"{fid_key}_reliable"}
        elif name == "kid":
            keys.add(kid_key)
        elif name == "lpips":
            keys.add(lpips_key(resolved_lpips_backbone(ev.lpips_backbone)))
        elif name == "clip_score":
            keys.add("eval/clip_score")
            if ev.protocol == "prompts":
                keys |= {f"eval/clip_score/p{i}" for i in range(len(ev.prompts))}
            if ev.prior_prompts:
                keys.add("eval/prior_clip_score")
                keys |= {f"eval/prior_clip_score/p{i}" for i in range(len(ev.prior_prompts))}
        else:
            keys.add(f"eval/{name}")
    return keys


def check_metric_names(cfg) -> None:
    """An objective or constraint on an ``eval/*`` metric the study cannot compute is a config error."""
    sweep = cfg.sweep
    if sweep is None:
        return
    available = computable_eval_keys(cfg)
    named = [("sweep.objectives", o.metric) for o in sweep.objectives]
    named += [("sweep.constraints", parse_constraint(text).metric) for text in sweep.constraints]
    for where, metric in named:
        if metric.startswith("eval/") and metric not in available:
            hint = ""
            if metric in ("eval/fid", "eval/kid", "eval/fd_clip", "eval/kd_clip"):
                hint = (
                    f" eval.fid_features={cfg.eval.fid_features} resolves to "
                    f"{resolved_fid_features(cfg.eval.fid_features)} features, which give "
                    f"{' and '.join(distance_keys(cfg.eval.fid_features))}"
                    " (eval/fid and eval/kid need Inception features from torch-fidelity)."
                )
            elif metric.startswith("eval/prior_clip_score"):
                hint = (
                    " eval/prior_clip_score scores the images of eval.prior_prompts (prompts the fine-tune must"
                    " not break); give some, e.g. eval.prior_prompts='[a photo of a dog]', and clip_score in"
                    " eval.metrics."
                )
            elif metric.startswith("eval/lpips"):
                hint = (
                    " eval/lpips needs the real LPIPS weights (eval.lpips_backbone=alex|vgg|squeeze, torchvision);"
                    " eval/lpips_clip is the offline variant; both need eval.protocol=heldout_captions and"
                    " lpips in eval.metrics."
                )
            raise ConfigError(
                f"Invalid config value {where}={metric!r}: this study cannot compute it; it computes "
                f"{sorted(available)}.{hint}"
            )


def check_eval_protocol(cfg) -> None:
    """Protocol-specific impossibilities, before any model loads."""
    ev = cfg.eval
    if ev.protocol == "heldout_captions":
        if ev.reference_dir:
            raise ConfigError(
                f"Invalid config value eval.reference_dir={ev.reference_dir!r}: eval.protocol=heldout_captions "
                "compares with exactly the held-out photos; set eval.reference_dir=null."
            )
        if cfg.data.num_heldout < 1:
            raise ConfigError(
                f"Invalid config value data.num_heldout={cfg.data.num_heldout}: eval.protocol=heldout_captions "
                "needs held-out captioned photos; set data.num_heldout to 2 or more."
            )
    elif "lpips" in ev.metrics:
        raise ConfigError(
            "Invalid config value eval.metrics: lpips compares each image with its own ground-truth photo, "
            "which only eval.protocol=heldout_captions has; set eval.protocol=heldout_captions or drop lpips."
        )
