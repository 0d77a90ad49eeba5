"""The value rules of a ``Config`` that its types cannot express; each failure is one ConfigError
naming the key, the value and the fix. Validation reads the config and changes nothing."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from sdsweep.config import constraints
from sdsweep.config.features import check_optimizer_available
from sdsweep.config.methods import check_method_options, method_names, method_spec
from sdsweep.config.resolve import get_key, sweep_params
from sdsweep.config.schema import Config, ParamSpec, SweepConfig
from sdsweep.config.shapes_ids import check_shapes_clip
from sdsweep.errors import ConfigError

ALLOWED = {
    "model.prediction_type": {"auto", "epsilon", "v_prediction"},
    "method.template": {"object", "style", "none"},
    "data.kind": {"demo", "imagefolder", "instances", "hf"},
    "train.lr_scheduler": {"constant", "constant_with_warmup", "cosine", "linear"},
    "train.mixed_precision": {"auto", "no", "fp16", "bf16"},
    "train.optimizer": {"adamw", "adamw8bit", "prodigy", "lion"},
    "eval.scheduler": {"dpmsolver++", "pndm", "ddim", "euler"},
    "eval.fid_features": {"auto", "inception", "clip"},
    "eval.dtype": {"auto", "fp32", "bf16", "fp16"},
    "eval.protocol": {"prompts", "heldout_captions"},
    "eval.lpips_backbone": {"auto", "alex", "vgg", "squeeze", "clip"},
    "tracking.backend": {"wandb", "none"},
    "tracking.mode": {"offline", "online", "disabled"},
    "sweep.sampler": {"grid", "tpe", "random", "gp", "cmaes"},
    "sweep.pruner": {"none", "median", "hyperband", "wilcoxon"},
    "sweep.isolation": {"subprocess", "inprocess"},
}
KNOWN_METRICS = {
    "clip_score",
    "fid",
    "kid",
    "clip_i",
    "dino",
    "cmmd",
    "appropriate_rate",
    "val_loss",
    "lpips",
}
POSITIVE = [
    "method.learning_rate",
    "train.max_train_steps",
    "train.train_batch_size",
    "train.gradient_accumulation_steps",
    "model.resolution",
    "eval.num_images_per_prompt",
    "eval.num_inference_steps",
    "eval.batch_size",
    "method.num_vectors",
    "method.rank",
]


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"Invalid config value {key}={value!r}: {fix}")


def validate(cfg: Config) -> Config:
    """Reject impossible values with a message naming the key and what is allowed; changes nothing."""
    for key, allowed in ALLOWED.items():
        if key.startswith("sweep.") and cfg.sweep is None:
            continue
        value = get_key(cfg, key)
        if value not in allowed:
            _fail(key, value, f"allowed values are {sorted(allowed)}.")
    spec = method_spec(cfg.method.name)
    if spec is None:  # the registered methods, plugins included
        _fail("method.name", cfg.method.name, f"allowed values are {sorted(method_names())}.")
    for key in POSITIVE:
        value = get_key(cfg, key)
        if value is None or not value > 0:
            _fail(key, value, "it must be greater than zero.")
    if cfg.eval.val_loss_bands < 0:
        _fail(
            "eval.val_loss_bands", cfg.eval.val_loss_bands, "give 0 (no bands) or a number of bands, e.g. 5."
        )
    for key in ("model.resolution", "data.resolution", "eval.resolution"):
        value = get_key(cfg, key)
        if value is not None and (value <= 0 or value % 8 != 0):
            _fail(key, value, "the resolution must be a positive multiple of 8 (the VAE downsamples by 8).")
    if cfg.train.lr_warmup_steps < 0:
        _fail("train.lr_warmup_steps", cfg.train.lr_warmup_steps, "it must be 0 or more.")
    if cfg.data.num_heldout < 0:
        _fail("data.num_heldout", cfg.data.num_heldout, "it must be 0 or more.")
    check_eval_prompts(cfg.eval.prompts)
    check_prior_prompts(cfg)
    check_shapes_clip(cfg.model.pretrained, cfg.eval.clip_model)  # one shapes build scores itself
    unknown = set(cfg.eval.metrics) - KNOWN_METRICS
    if unknown:
        _fail(
            "eval.metrics",
            cfg.eval.metrics,
            f"unknown metric(s) {sorted(unknown)}; allowed are {sorted(KNOWN_METRICS)}.",
        )
    if cfg.data.kind == "demo" and cfg.data.path:
        _fail(
            "data.path",
            cfg.data.path,
            "data=demo trains on the built-in demo images and would ignore it. Add data=imagefolder "
            "(captions in metadata.jsonl/csv) or data=instances (one prompt for all images).",
        )
    constraints.check_eval_protocol(cfg)
    if cfg.data.kind in ("imagefolder", "instances", "hf") and not cfg.data.path:
        _fail("data.path", None, f"data={cfg.data.kind} needs data.path=<folder of images>.")
    swept = (sweep_params(cfg.sweep).get("method") or ParamSpec()) if cfg.sweep else ParamSpec()
    check_method_options(cfg.method, [str(m) for m in swept.choices or []])
    if spec.check is not None:
        spec.check(cfg)
    if not 0.0 < cfg.method.ema_decay < 1.0:
        _fail("method.ema_decay", cfg.method.ema_decay, "it must lie strictly between 0 and 1.")
    _validate_recipes(cfg)
    if not isinstance(cfg.train.num_processes, int) or cfg.train.num_processes < 1:
        _fail("train.num_processes", cfg.train.num_processes, "give a whole number >= 1 (ranks of one run).")
    if cfg.sweep is not None:
        _validate_sweep(cfg)
    return cfg


def check_eval_prompts(prompts: list[str]) -> None:
    """The one rule for validation prompts; the evaluator calls it too (for prompts it is handed)."""
    if not prompts or any(not str(p).strip() for p in prompts):
        _fail(
            "eval.prompts",
            list(prompts or []),
            "give at least one non-empty validation prompt, e.g. eval.prompts='[a photo of sks]'.",
        )


def check_prior_prompts(cfg: Config) -> None:
    """``eval.prior_prompts`` ask for what the base model already draws: never the concept being taught."""
    prior = [str(p) for p in cfg.eval.prior_prompts or []]
    if any(not p.strip() for p in prior):
        _fail("eval.prior_prompts", prior, "every prior prompt must be non-empty (or give an empty list).")
    shared = sorted(set(prior) & {str(p) for p in cfg.eval.prompts})
    if shared:
        _fail(
            "eval.prior_prompts",
            prior,
            f"{shared} is also in eval.prompts; a prompt is either what the fine-tune should learn "
            "(eval.prompts) or what it must keep (eval.prior_prompts), not both.",
        )
    spec = method_spec(cfg.method.name)
    placeholder = spec.concept_token(cfg.method) if spec else None
    concept_words = {w for w in (cfg.data.trigger_word, placeholder) if w}
    for prompt in prior:
        named = concept_words & set(prompt.replace(",", " ").split())
        if named:
            _fail(
                "eval.prior_prompts",
                prior,
                f"{prompt!r} names the concept being taught ({sorted(named)[0]}); prior prompts measure "
                "drift on what the base model already draws, so name the class instead (e.g. 'a photo of "
                "a dog' beside eval.prompts='[a photo of sks dog]').",
            )


def _validate_recipes(cfg: Config) -> None:
    """The train.* recipe knobs (optimizer, zero-terminal SNR, perturbation, dropout, buckets)."""
    train = cfg.train
    if not isinstance(cfg.data.keep_tokens, int) or cfg.data.keep_tokens < 0:
        _fail("data.keep_tokens", cfg.data.keep_tokens, "give a whole number >= 0 (tags kept in place).")
    for key in ("train.input_perturbation", "train.caption_dropout"):
        value = get_key(cfg, key)
        if not 0.0 <= value < 1.0:
            _fail(key, value, "it must lie in [0, 1) (0 turns it off).")
    if cfg.eval.guidance_rescale is not None and not 0.0 <= cfg.eval.guidance_rescale <= 1.0:
        _fail(
            "eval.guidance_rescale", cfg.eval.guidance_rescale, "it must lie in [0, 1] (0.7 is the paper's)."
        )
    if train.zero_terminal_snr:
        if cfg.model.prediction_type == "epsilon":
            _fail(
                "train.zero_terminal_snr",
                True,
                "an epsilon model cannot denoise from pure noise (alpha-bar 0 at the last step); use a "
                "v-prediction model or model.prediction_type=v_prediction (as Lin et al. 2023 do).",
            )
        if cfg.eval.scheduler == "pndm":
            _fail(
                "eval.scheduler",
                "pndm",
                "PNDM has no zero-terminal-SNR mode; use dpmsolver++, ddim or euler.",
            )
    for key in ("train.bucket_step", "train.bucket_min_side", "train.bucket_max_side"):
        value = get_key(cfg, key)
        if value is not None and value <= 0:
            _fail(key, value, "it must be a positive number of pixels, or null for the automatic value.")
    if train.bucket_max_ratio < 1.0:
        _fail(
            "train.bucket_max_ratio", train.bucket_max_ratio, "it must be at least 1 (1 means square only)."
        )
    check_optimizer_available(cfg)
    # A swept recipe choice is checked now, not when its trial starts hours into the sweep.
    optimizer_choices = (cfg.sweep.params.get("train.optimizer") if cfg.sweep else None) or ParamSpec()
    for choice in optimizer_choices.choices or []:
        if choice not in ALLOWED["train.optimizer"]:
            _fail(
                "sweep.params.train.optimizer",
                choice,
                f"allowed values are {sorted(ALLOWED['train.optimizer'])}.",
            )
        check_optimizer_available(
            dataclasses.replace(cfg, train=dataclasses.replace(train, optimizer=choice))
        )


def _validate_sweep(cfg: Config) -> None:
    sweep = cfg.sweep
    assert sweep is not None
    params = sweep_params(sweep)  # what normalise() will store; validate() itself changes nothing
    if not params and not sweep.single_run:  # the one-run sweep a saved trial config records
        _fail("sweep.params", {}, "a sweep needs at least one parameter, e.g. method.learning_rate.")
    for key, spec in params.items():
        _validate_param(cfg, key, spec)
    _validate_lr_ranges(sweep, params)
    _validate_objectives(sweep)
    for text in sweep.constraints:
        constraints.parse_constraint(text)
    constraints.check_metric_names(cfg)
    _check_sampler(sweep)
    _validate_trial_counts(sweep)
    if not 0 < sweep.pruner_alpha < 1:
        _fail(
            "sweep.pruner_alpha", sweep.pruner_alpha, "give a significance level between 0 and 1, e.g. 0.05."
        )
    _validate_parallel(sweep)


def _validate_param(cfg: Config, key: str, spec: ParamSpec) -> None:
    """One searched parameter: an existing config key with choices (grid) or a valid low..high range."""
    try:
        get_key(cfg, key)
    except (AttributeError, KeyError):
        _fail(
            f"sweep.params.{key}",
            key,
            "that config key does not exist; use dotted keys such as train.max_train_steps.",
        )
    ranged = spec.choices is None and spec.low is not None and spec.high is not None
    if ranged and cfg.sweep.sampler == "grid":
        _fail(
            f"sweep.params.{key}",
            dataclasses.asdict(spec),
            "the grid sampler needs choices: [...] for every parameter.",
        )
    _check_range(f"sweep.params.{key}", spec, positive=key in POSITIVE)


def _check_range(name: str, spec: ParamSpec, positive: bool) -> None:
    """A ParamSpec by itself: choices (at least one) or low..high (low <= high, log needs low > 0)."""
    if spec.choices is None and (spec.low is None or spec.high is None):
        _fail(name, dataclasses.asdict(spec), "give either choices: [...] or low and high.")
    if spec.choices is not None and not spec.choices:
        _fail(f"{name}.choices", [], "give at least one choice.")
    if spec.low is not None and spec.high is not None and spec.low > spec.high:
        _fail(name, dataclasses.asdict(spec), "low must not exceed high.")
    if spec.log and spec.low is not None and spec.low <= 0:
        _fail(f"{name}.low", spec.low, "a log-scale range needs low > 0.")
    if positive:
        values = spec.choices if spec.choices is not None else [spec.low, spec.high]
        if any(v is None or not isinstance(v, (int, float)) or v <= 0 for v in values):
            _fail(name, values, "every value must be a number greater than zero.")


def _validate_lr_ranges(sweep: SweepConfig, params: dict[str, ParamSpec]) -> None:
    """Each method's and each model x method's own learning-rate range. A per-method range for a method
    that is not swept is harmless (narrowing ``method`` on the command line keeps the recipe's ranges); a
    per-model one names a pair, and a pair that is never drawn is a typo, so it must name swept values."""
    for method, spec in sweep.learning_rate_by_method.items():
        _check_range(f"sweep.learning_rate_by_method.{method}", spec, positive=True)
    swept = {
        part: [str(c) for c in (params.get(part) or ParamSpec()).choices or []]
        for part in ("model", "method")
    }
    for key, spec in sweep.learning_rate_by_model_method.items():
        name = f"sweep.learning_rate_by_model_method.{key}"
        model, sep, method = str(key).partition("/")
        if not sep:
            _fail(name, key, "name a model and a method as <model>/<method>, e.g. sdxl/lora.")
        for part, value in (("model", model), ("method", method)):
            if value not in swept[part]:
                _fail(
                    name,
                    key,
                    f"{part} {value!r} is not among the swept {part} choices {swept[part]} "
                    f"(sweep.params.{part}); a range for a pair that is never drawn would never be used.",
                )
        _check_range(name, spec, positive=True)
    _check_grid_lr_ranges(sweep, swept["method"])


def _check_grid_lr_ranges(sweep: SweepConfig, swept_methods: list[str]) -> None:
    """A grid is one rectangle of sweep.params: it never draws a per-method or per-model range, and running
    every method at the recipe's lr instead would quietly answer another question."""
    if sweep.sampler != "grid":
        return
    used = [
        ("method", m, spec) for m, spec in sweep.learning_rate_by_method.items() if str(m) in swept_methods
    ]
    used += [("model_method", key, spec) for key, spec in sweep.learning_rate_by_model_method.items()]
    if used:
        kind, key, spec = used[0]
        removals = " ".join(f"'~sweep.learning_rate_by_{k}.{name}'" for k, name, _ in used)
        _fail(
            f"sweep.learning_rate_by_{kind}.{key}",
            dataclasses.asdict(spec),
            "the grid sampler (sweep.sampler=grid) draws only sweep.params, so this range would be ignored: "
            "use a search sampler (sweep.sampler=tpe or random), or drop the ranges to train every grid point "
            f"at method.learning_rate (or at sweep.learning_rates): {removals}.",
        )


def _validate_objectives(sweep: SweepConfig) -> None:
    """At least one objective, each a logged eval/ or train/ metric with a direction."""
    if not sweep.objectives:
        _fail(
            "sweep.objectives",
            [],
            "give at least one objective, e.g. {metric: eval/clip_score, direction: maximize}.",
        )
    for obj in sweep.objectives:
        if obj.direction not in ("maximize", "minimize"):
            _fail("sweep.objectives.direction", obj.direction, "allowed values are ['maximize', 'minimize'].")
        if not obj.metric.startswith(("eval/", "train/")):
            _fail(
                "sweep.objectives.metric",
                obj.metric,
                "name a logged metric such as eval/clip_score or eval/fd_clip.",
            )


def _validate_trial_counts(sweep: SweepConfig) -> None:
    """``n_trials`` positive (or null), and ``replicates`` only on a grid that does not also sweep the seed."""
    if sweep.n_trials is not None and sweep.n_trials <= 0:
        _fail("sweep.n_trials", sweep.n_trials, "it must be greater than zero (or null for the whole grid).")
    if sweep.replicates < 1:
        _fail("sweep.replicates", sweep.replicates, "give 1 (one training seed per point) or more.")
    seeds = sweep.params.get("train.seed")
    replicate_seeds = list(range(sweep.replicates))
    if sweep.replicates > 1 and (
        sweep.sampler != "grid" or (seeds is not None and list(seeds.choices or []) != replicate_seeds)
    ):
        _fail(
            "sweep.replicates",
            sweep.replicates,
            "replicates retrain every grid point with training seeds 0..replicates-1: use sampler grid and "
            "do not also sweep train.seed.",
        )


def _check_sampler(sweep: SweepConfig) -> None:
    """CMA-ES: one objective, no constraints (Optuna's CmaEsSampler ignores them), the cmaes package."""
    if sweep.sampler != "cmaes":
        return
    if sweep.constraints:
        _fail(
            "sweep.sampler",
            "cmaes",
            f"Optuna's CMA-ES sampler ignores constraints ({list(sweep.constraints)}); use sweep.sampler=gp "
            "or tpe, which honour them, or drop sweep.constraints.",
        )
    if len(sweep.objectives) > 1:
        _fail("sweep.sampler", "cmaes", "CMA-ES optimises one objective; use sweep.sampler=gp or tpe.")
    if importlib.util.find_spec("cmaes") is None:
        _fail("sweep.sampler", "cmaes", "it needs the cmaes package: pip install 'sdsweep[cmaes]'.")


def _validate_parallel(sweep: SweepConfig) -> None:
    workers = sweep.workers
    if not (
        workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1)
    ):
        _fail("sweep.workers", workers, 'give a whole number >= 1 or "auto" (one per visible GPU).')
    if sweep.devices is not None and (
        not sweep.devices or any(not isinstance(d, int) or d < 0 for d in sweep.devices)
    ):
        _fail(
            "sweep.devices", sweep.devices, "give CUDA device indices, e.g. [0,1], or null for all visible."
        )
    if sweep.max_retries < 0:
        _fail("sweep.max_retries", sweep.max_retries, "it must be 0 or more.")
    if sweep.stop_after_failures < 0:
        _fail("sweep.stop_after_failures", sweep.stop_after_failures, "it must be 0 (never) or more.")
    if sweep.heartbeat_interval <= 0:
        _fail("sweep.heartbeat_interval", sweep.heartbeat_interval, "it must be greater than zero seconds.")
    if sweep.grace_period <= 2 * sweep.heartbeat_interval:
        _fail(
            "sweep.grace_period",
            sweep.grace_period,
            f"it must exceed twice sweep.heartbeat_interval ({sweep.heartbeat_interval}s), or live runs are taken over.",
        )
