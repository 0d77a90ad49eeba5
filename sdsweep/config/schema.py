"""Typed configuration schemas.

Every YAML file under ``conf/`` is merged onto these dataclasses, so a misspelt key or a value of
the wrong type fails when Hydra composes the config, before any model is loaded. Value checks that
types cannot express (positive learning rates, known scheduler names, ...) live in ``validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sdsweep.config import constraints
from sdsweep.config.methods import METHOD_SCHEMAS, MethodConfig, check_method_options
from sdsweep.errors import ConfigError


@dataclass
class PathsConfig:
    root: str = "experiments"  # every study writes to <root>/<study>/
    cache: Optional[str] = None  # None: $SDSWEEP_CACHE or ~/.cache/sdsweep (tiny models, demo data)


@dataclass
class ModelConfig:
    name: str = "tiny"
    # Hub ID (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local folder, or ``tiny:sd15`` /
    # ``tiny:sd21`` for the offline random-weight models.
    pretrained: str = "tiny:sd15"
    path: Optional[str] = None  # a local diffusers folder; wins over ``pretrained``
    revision: Optional[str] = None
    variant: Optional[str] = None
    resolution: int = 32  # the model's native training resolution
    prediction_type: str = "auto"  # auto (read from the scheduler) | epsilon | v_prediction


@dataclass
class DataConfig:
    kind: str = "demo"  # demo | imagefolder | instances
    path: Optional[str] = None
    image_column: Optional[str] = None  # None: detect file_name / image / image_file / path
    caption_column: Optional[str] = None  # None: detect text / caption / prompt
    instance_prompt: Optional[str] = None  # the single prompt for kind=instances (and DreamBooth)
    trigger_word: Optional[str] = None  # the token bound to the subject, e.g. "sks"
    resolution: Optional[int] = None  # None: the model's resolution
    center_crop: bool = True
    random_flip: bool = True
    num_heldout: int = 2  # images kept out of training for val_loss and FID/KID references
    demo_num_images: int = 10  # size of the generated demo set (kind=demo)


@dataclass
class TrainConfig:
    max_train_steps: int = 400
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"  # constant | constant_with_warmup | cosine | linear
    lr_warmup_steps: int = 0
    seed: int = 0
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | fp16 | bf16
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    compile: bool = False  # torch.compile the UNet (inductor: triton on CUDA, a C compiler on CPU)
    channels_last: bool = False  # NHWC memory format for the UNet's convolutions (faster on tensor cores)
    snr_gamma: Optional[float] = None  # min-SNR-gamma weighting; 5.0 is the paper's value
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_latent_cache: bool = True
    loss_explosion_factor: float = 100.0  # fail the trial when loss > factor x its first value
    log_every: int = 1
    checkpoint_at_milestones: bool = True  # lets an interrupted run resume from the last milestone
    # Data-parallel ranks for one run (README "Several GPUs for one run"): each rank trains
    # train_batch_size samples per micro-step, so the global batch is
    # train_batch_size x num_processes x gradient_accumulation_steps. One device per rank on CUDA;
    # on CPU the ranks share the cores (gloo).
    num_processes: int = 1
    # ---- recipe knobs (README "Recipe knobs"); every one is sweepable as train.<name>
    # adamw | adamw8bit (bitsandbytes, CUDA) | prodigy (prodigyopt; lr is then a multiplier, normally
    # 1.0) | lion (lion-pytorch; wants ~3-10x smaller lr and ~3-10x larger weight decay than AdamW)
    optimizer: str = "adamw"
    # Lin et al. 2023: rescale the betas so the last timestep is pure noise (alpha-bar 0); evaluation
    # then samples with trailing timestep spacing and eval.guidance_rescale. Needs v-prediction.
    zero_terminal_snr: bool = False
    input_perturbation: float = 0.0  # extra noise on the UNet input only; 0.1 in diffusers' examples
    caption_dropout: float = 0.0  # probability of training a sample on the empty caption (CFG's branch)
    # Aspect-ratio buckets: each image is resized to the bucket (w, h) nearest its aspect ratio, with
    # w x h <= resolution^2 and sides a multiple of bucket_step; every batch holds one bucket.
    bucketing: bool = False
    bucket_step: Optional[int] = None  # None: the model's size multiple (64 px for SD, 4 px for tiny)
    bucket_min_side: Optional[int] = None  # None: resolution / 2 (256 at 512, as kohya)
    bucket_max_side: Optional[int] = None  # None: resolution x 2 (1024 at 512, as kohya)
    bucket_max_ratio: float = 2.0  # the longest/shortest side of the most elongated bucket


@dataclass
class EvalConfig:
    # prompts: eval.prompts x num_images_per_prompt; FID/KID against the reference photos.
    # heldout_captions: one image per held-out caption (fixed seeds), FID/KID against exactly those photos,
    # paired LPIPS per image, CLIP score with each caption (the test-set protocol of full fine-tunes).
    protocol: str = "prompts"
    prompts: list[str] = field(default_factory=lambda: ["a photo of sks"])
    num_images_per_prompt: int = 2
    seed: int = 1234  # image i of every prompt uses seed + i
    num_inference_steps: int = 25
    scheduler: str = "dpmsolver++"  # dpmsolver++ | pndm | ddim | euler
    guidance_scale: float = 7.5
    batch_size: int = 8
    resolution: Optional[int] = None  # None: the model's resolution
    metrics: list[str] = field(
        default_factory=lambda: ["clip_score", "fid", "kid", "clip_i", "appropriate_rate", "val_loss"]
    )
    clip_model: str = "openai/clip-vit-large-patch14"  # or "tiny" for the offline CLIP
    reference_dir: Optional[str] = None  # None: the held-out training images
    # auto (inception if available, else clip) | inception | clip. Inception features give eval/fid and
    # eval/kid; CLIP features give eval/fd_clip and eval/kd_clip (a different number on a different scale).
    fid_features: str = "auto"
    # auto (alex when torchvision is installed, else clip) | alex | vgg | squeeze (eval/lpips, torchmetrics)
    # | clip (eval/lpips_clip: LPIPS's structure on the offline CLIP vision tower, equal layer weights)
    lpips_backbone: str = "auto"
    kid_subset_size: int = 50
    min_reliable_fid_images: int = 200
    safety_checker: Optional[str] = None  # e.g. CompVis/stable-diffusion-safety-checker
    val_loss_timesteps: int = 8  # fixed timesteps per held-out image for eval/val_loss
    baseline: bool = True  # evaluate the untuned base model once per study
    dtype: str = "auto"  # sampling precision: auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    judge: Optional[str] = None  # "shapes": ground-truth truth/concept_accuracy and truth/prior_accuracy
    # Rescaled classifier-free guidance (Lin et al. 2023). None: 0.7 with train.zero_terminal_snr, else 0.
    guidance_rescale: Optional[float] = None


@dataclass
class TrackingConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "sdsweep"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    dir: Optional[str] = None  # None: <study>/wandb
    tags: list[str] = field(default_factory=list)
    log_images: bool = True
    # Seconds between writes of an offline run's .wandb file while it trains (what `wandb sync` and
    # readers of the file see live); wandb's own default is 15.
    flush_seconds: float = 15.0


@dataclass
class ParamSpec:
    """One search dimension. Give ``choices`` for a grid/categorical, or ``low``/``high``."""

    choices: Optional[list[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    type: str = "float"  # float | int (for low/high ranges)


@dataclass
class ObjectiveSpec:
    metric: str = "eval/clip_score"
    direction: str = "maximize"  # maximize | minimize


@dataclass
class SweepConfig:
    name: str = "lr_steps"
    sampler: str = "grid"  # grid | tpe | random
    # Dotted config keys -> search dimension, e.g. ``method.learning_rate: {choices: [1e-5, 1e-4]}``.
    params: dict[str, ParamSpec] = field(default_factory=dict)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec()])
    constraints: list[str] = field(default_factory=list)  # e.g. "eval/appropriate_rate >= 0.75"
    pruner: str = "none"  # none | median | hyperband
    # Trials WITH A RESULT (complete, pruned, or failed for good) the study should reach: None means
    # the whole grid (grid) or 20 (tpe/random). Attempts that were handed back (Ctrl-C), taken over
    # from a dead worker and retried, or lost a claim race do not count.
    n_trials: Optional[int] = None
    timeout: Optional[float] = None  # seconds
    # Optuna storage shared by every worker and machine on this study. None: sqlite under the study
    # folder. Also sqlite:///path.db, postgresql+psycopg://user@host/db (many machines), or a
    # JournalStorage file on a shared filesystem: journal:///abs/path/study.log (or a path ending .log/.journal).
    storage: Optional[str] = None
    # Training runs at once on this machine: an int, or "auto" (one per visible CUDA device, 1 on CPU).
    # Each worker is a long-lived process that imports torch once and runs many runs.
    workers: Any = 1
    # CUDA device indices to use (None: all visible); worker i runs on devices[i % len(devices)].
    devices: Optional[list[int]] = None
    max_retries: int = 2  # a run whose worker died is retried this often before its trials stay FAIL
    heartbeat_interval: float = 10.0  # seconds between a worker's heartbeats in the storage
    grace_period: float = 60.0  # a RUNNING trial silent this long is taken over by another worker
    # Stop early, with one message, when the first this-many trials all fail with the same
    # configuration-type error (missing model, bad config): nothing else would succeed either. 0: never.
    stop_after_failures: int = 3
    share_milestones: bool = True  # one training run serves every step count of a grid row
    keep_best_k: int = 3  # trials outside the best k lose their weights (-1 keeps all)
    isolation: str = "subprocess"  # subprocess (crash-proof) | inprocess (faster, for tests)
    retry_failed: bool = False  # re-run grid points that failed on a previous invocation
    build_report: bool = True  # write report.html/md when the sweep ends
    skip_unavailable: bool = False  # drop swept model/method/data values that are not available, with a note
    seed: int = 0  # sampler seed
    # Command-line shortcuts for the common grid (dotted dict keys cannot be overridden from a shell):
    # sweep.learning_rates=[1e-5,1e-4] sweep.steps=[400,800] replace those two params' choices.
    learning_rates: Optional[list[float]] = None
    # Search samplers: when the method itself is swept, each method samples its lr from its own range
    # (textual inversion wants ~100x the lr of a full fine-tune).
    learning_rate_by_method: dict[str, ParamSpec] = field(default_factory=dict)
    steps: Optional[list[int]] = None


@dataclass
class Config:
    study: str = "default"  # the folder under paths.root and the W&B group
    # Start the study over: the old folder is moved aside to <study>.old-<UTC time>, files kept.
    study_reset: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: Optional[SweepConfig] = None


def data_tag(kind: str, path: Optional[str] = None) -> str:
    """A short name for the dataset in the default study name: ``demo``, or the data folder's name."""
    if kind == "demo" or not path:
        return str(kind)
    name = Path(str(path).rstrip("/\\")).expanduser().name or str(kind)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or str(kind)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, schema in METHOD_SCHEMAS.items():  # conf/method/<name>.yaml sets only these options
        cs.store(group="method", name=f"{name}_schema", node=schema)
    OmegaConf.register_new_resolver("data_tag", data_tag, replace=True)


ALLOWED = {
    "model.prediction_type": {"auto", "epsilon", "v_prediction"},
    "method.name": {"full", "dreambooth", "textual_inversion", "lora"},
    "method.template": {"object", "style", "none"},
    "data.kind": {"demo", "imagefolder", "instances"},
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
    "sweep.sampler": {"grid", "tpe", "random"},
    "sweep.pruner": {"none", "median", "hyperband"},
    "sweep.isolation": {"subprocess", "inprocess"},
}
KNOWN_METRICS = {"clip_score", "fid", "kid", "clip_i", "appropriate_rate", "val_loss", "lpips"}
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


def get_key(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"Invalid config value {key}={value!r}: {fix}")


def sweep_params(sweep: SweepConfig) -> dict[str, ParamSpec]:
    """``sweep.params`` with the ``sweep.learning_rates`` / ``sweep.steps`` shorthands applied (a new dict)."""
    params = dict(sweep.params)
    if sweep.learning_rates is not None:
        params["method.learning_rate"] = ParamSpec(choices=list(sweep.learning_rates))
    if sweep.steps is not None:
        params["train.max_train_steps"] = ParamSpec(choices=list(sweep.steps), type="int")
    return params


def normalise(cfg: Config) -> Config:
    """The one step that rewrites a config: the sweep shorthands become ``sweep.params`` entries.

    Called where configs are built (``to_typed``, ``load_yaml``), before ``validate``, which only reads."""
    if cfg.sweep is not None:
        cfg.sweep.params = sweep_params(cfg.sweep)
    return cfg


def validate(cfg: Config) -> Config:
    """Reject impossible values with a message naming the key and what is allowed; changes nothing."""
    for key, allowed in ALLOWED.items():
        if key.startswith("sweep.") and cfg.sweep is None:
            continue
        value = get_key(cfg, key)
        if value not in allowed:
            _fail(key, value, f"allowed values are {sorted(allowed)}.")
    for key in POSITIVE:
        value = get_key(cfg, key)
        if value is None or not value > 0:
            _fail(key, value, "it must be greater than zero.")
    for key in ("model.resolution", "data.resolution", "eval.resolution"):
        value = get_key(cfg, key)
        if value is not None and (value <= 0 or value % 8 != 0):
            _fail(key, value, "the resolution must be a positive multiple of 8 (the VAE downsamples by 8).")
    if cfg.train.lr_warmup_steps < 0:
        _fail("train.lr_warmup_steps", cfg.train.lr_warmup_steps, "it must be 0 or more.")
    if cfg.data.num_heldout < 0:
        _fail("data.num_heldout", cfg.data.num_heldout, "it must be 0 or more.")
    check_eval_prompts(cfg.eval.prompts)
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
    if cfg.data.kind in ("imagefolder", "instances") and not cfg.data.path:
        _fail("data.path", None, f"data={cfg.data.kind} needs data.path=<folder of images>.")
    swept = (sweep_params(cfg.sweep).get("method") or ParamSpec()) if cfg.sweep else ParamSpec()
    check_method_options(cfg.method, [str(m) for m in swept.choices or []])
    if cfg.method.name == "dreambooth":
        check_dreambooth_prompts(cfg)
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


def check_dreambooth_prompts(cfg: Config) -> None:
    """The one DreamBooth rule set: ``validate`` runs it, and so does the method before it trains."""
    method = cfg.method
    if not cfg.data.instance_prompt:
        _fail(
            "data.instance_prompt",
            None,
            "DreamBooth needs the one prompt every instance image is trained with; it should contain a "
            "rare identifier bound to the subject, e.g. data.instance_prompt='a photo of sks dog'.",
        )
    if not method.with_prior_preservation:
        return
    if not method.class_prompt:
        _fail(
            "method.class_prompt",
            None,
            "prior preservation needs a class prompt for the subject's class without the identifier, "
            "e.g. method.class_prompt='a photo of a dog' (or set method.with_prior_preservation=false).",
        )
    if method.num_class_images < 1:
        _fail(
            "method.num_class_images",
            method.num_class_images,
            "prior preservation needs class images; use 50-200 (or set method.with_prior_preservation=false).",
        )
    if cfg.train.bucketing:
        _fail(
            "train.bucketing",
            True,
            "DreamBooth prior preservation trains square class images in the same batch; set "
            "method.with_prior_preservation=false or train.bucketing=false.",
        )


def _validate_recipes(cfg: Config) -> None:
    """The train.* recipe knobs (optimizer, zero-terminal SNR, perturbation, dropout, buckets)."""
    train = cfg.train
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
    from sdsweep.training.optimizers import (
        check_optimizer_available,  # local import keeps config free of cycles
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
    if not params:
        _fail("sweep.params", {}, "a sweep needs at least one parameter, e.g. method.learning_rate.")
    for key, spec in params.items():
        try:
            get_key(cfg, key)
        except (AttributeError, KeyError):
            _fail(
                f"sweep.params.{key}",
                key,
                "that config key does not exist; use dotted keys such as train.max_train_steps.",
            )
        if spec.choices is None and (spec.low is None or spec.high is None):
            _fail(
                f"sweep.params.{key}", dataclasses.asdict(spec), "give either choices: [...] or low and high."
            )
        if spec.choices is not None and not spec.choices:
            _fail(f"sweep.params.{key}.choices", [], "give at least one choice.")
        if spec.choices is None and sweep.sampler == "grid":
            _fail(
                f"sweep.params.{key}",
                dataclasses.asdict(spec),
                "the grid sampler needs choices: [...] for every parameter.",
            )
        if spec.low is not None and spec.high is not None and spec.low > spec.high:
            _fail(f"sweep.params.{key}", dataclasses.asdict(spec), "low must not exceed high.")
        if spec.log and spec.low is not None and spec.low <= 0:
            _fail(f"sweep.params.{key}.low", spec.low, "a log-scale range needs low > 0.")
        if key in POSITIVE:
            values = spec.choices if spec.choices is not None else [spec.low, spec.high]
            if any(v is None or not isinstance(v, (int, float)) or v <= 0 for v in values):
                _fail(f"sweep.params.{key}", values, "every value must be a number greater than zero.")
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
    for text in sweep.constraints:
        constraints.parse_constraint(text)
    constraints.check_metric_names(cfg)
    if sweep.n_trials is not None and sweep.n_trials <= 0:
        _fail("sweep.n_trials", sweep.n_trials, "it must be greater than zero (or null for the whole grid).")
    _validate_parallel(sweep)


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


def _schema_of(annotation: Any) -> Any:
    """The dataclass a field holds, or ("dict"|"list", dataclass) for containers of dataclasses."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _schema_of(args[0])
    if dataclasses.is_dataclass(annotation):
        return annotation
    if origin in (dict, list) and args and dataclasses.is_dataclass(args[-1]):
        return (origin.__name__, args[-1])
    return None


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for name, annotation in typing.get_type_hints(schema).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        inner = _schema_of(annotation)
        if dataclasses.is_dataclass(inner):
            keys.extend(_valid_keys(inner, f"{dotted}."))
    return keys


def unknown_keys(node: Any, schema: type = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Dotted keys in a composed config that the schema does not have (typos added with ``+``)."""
    schema = schema or Config
    hints = typing.get_type_hints(schema)
    found = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            if not (prefix == "" and key == "hydra"):
                found.append(dotted)
            continue
        inner = _schema_of(hints[key])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            found.extend(unknown_keys(value, inner, f"{dotted}."))
        elif isinstance(inner, tuple) and inner[0] == "dict" and isinstance(value, dict):
            for name, item in value.items():
                if isinstance(item, dict):
                    found.extend(unknown_keys(item, inner[1], f"{dotted}.{name}."))
        elif isinstance(inner, tuple) and inner[0] == "list" and isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    found.extend(unknown_keys(item, inner[1], f"{dotted}[{index}]."))
    return found


def reject_unknown_keys(raw: DictConfig) -> None:
    """Hydra's ``+key=value`` adds keys the typed schema never sees; a typo would pass silently."""
    container = OmegaConf.to_container(raw, resolve=False)
    unknown = unknown_keys(container)
    if not unknown:
        return
    valid = _valid_keys(Config)
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        lines.append(f"'{key}'" + (f" (did you mean {close[0]}?)" if close else ""))
    raise ConfigError(
        f"Unknown config key{'s' if len(lines) > 1 else ''} {', '.join(lines)}. Fix the spelling (and drop the "
        "'+', which adds new keys); the valid keys are in conf/ and sdsweep/config/schema.py."
    )


def to_typed(cfg: DictConfig | Config) -> Config:
    """A composed DictConfig -> a validated ``Config`` dataclass with interpolations resolved."""
    if isinstance(cfg, Config):
        return validate(normalise(cfg))
    reject_unknown_keys(cfg)
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, Config):  # composed without the schema (e.g. a saved trial config)
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        typed = OmegaConf.to_object(merged)
    return validate(normalise(typed))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_yaml(path: str) -> Config:
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    return validate(normalise(OmegaConf.to_object(merged)))


def flatten(cfg: Config) -> dict[str, Any]:
    """A flat {dotted.key: value} view, for W&B config and result tables."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", container)
    return out


def resolved_resolution(cfg: Config) -> int:
    return cfg.data.resolution or cfg.model.resolution


def resolved_guidance_rescale(cfg: Config) -> float:
    """eval.guidance_rescale, or its default: 0.7 with zero-terminal SNR (Lin et al. 2023), else 0."""
    if cfg.eval.guidance_rescale is not None:
        return cfg.eval.guidance_rescale
    return 0.7 if cfg.train.zero_terminal_snr else 0.0
