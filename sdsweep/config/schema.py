"""Typed configuration schemas, registered with Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged onto these dataclasses, so a misspelt key or a value of
the wrong type fails when Hydra composes the config, before any model is loaded. Value checks that
types cannot express (positive learning rates, known scheduler names, ...) live in
``sdsweep.config.validate``; building a validated ``Config`` from YAML lives in ``sdsweep.config.load``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sdsweep.config.methods import METHOD_SCHEMAS, MethodConfig, load_plugins


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
    # A VAE folder (diffusers layout) or hub ID used instead of the model's own, e.g. the fp16-safe SDXL VAE
    # madebyollin/sdxl-vae-fp16-fix (the stock SDXL VAE overflows to NaN in fp16).
    vae_path: Optional[str] = None


@dataclass
class DataConfig:
    kind: str = "demo"  # demo | imagefolder | instances | hf
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
    # kind=imagefolder without metadata.jsonl/csv: the caption file beside each image (kohya layout)
    caption_extension: str = ".txt"
    shuffle_tags: bool = False  # shuffle comma-separated caption tags per draw (kohya's shuffle_caption)
    keep_tokens: int = 0  # with shuffle_tags: the first N tags stay in place (kohya's keep_tokens)
    split: str = (
        "train"  # kind=hf: the split to train on; held-out images come from test/validation if present
    )


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
    # Prompts the base model already handles, which the fine-tune must not break (language drift: after
    # DreamBooth on "a photo of sks dog", "a photo of a dog" draws sks). Sampled with the same seeds, scored
    # apart as eval/prior_clip_score, so that eval/clip_score is about eval.prompts alone. Empty: no check.
    prior_prompts: list[str] = field(default_factory=list)
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
    # eval/dino (DreamBooth's DINO subject fidelity): a transformers ViT, hub id or folder; "tiny" offline
    dino_model: str = "facebook/dino-vits16"
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
    # eval/val_loss/t<lo>-<hi>: the same draws in this many equal timestep bands (5: t0-199 ... t800-999); 0: off
    val_loss_bands: int = 5
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
    sampler: str = "grid"  # grid | tpe | random | gp (Gaussian process) | cmaes (needs the cmaes extra)
    # Dotted config keys -> search dimension, e.g. ``method.learning_rate: {choices: [1e-5, 1e-4]}``.
    params: dict[str, ParamSpec] = field(default_factory=dict)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec()])
    constraints: list[str] = field(default_factory=list)  # e.g. "eval/appropriate_rate >= 0.75"
    # none | median | hyperband (on val_loss) | wilcoxon: a run stops at a milestone whose evaluation is worse
    # than the best trial so far on the shared units (one-sided paired Wilcoxon, p < pruner_alpha).
    pruner: str = "none"
    pruner_alpha: float = 0.05
    # Training-seed replicates: every grid point is trained with each of these training seeds
    # (train.seed = 0..replicates-1), and results are judged per configuration (mean over its seeds).
    replicates: int = 1
    # Trials WITH A RESULT (complete, pruned, or failed for good) the study should reach: None means
    # the whole grid (grid) or 20 (tpe/random). Attempts that were handed back (Ctrl-C), taken over
    # from a dead worker and retried, or lost a claim race do not count.
    n_trials: Optional[int] = None
    timeout: Optional[float] = None  # seconds
    # Optuna storage shared by every worker and machine on this study. None: sqlite under the study
    # folder. Also sqlite:///path.db, postgresql+psycopg://user@host/db (many machines), or a
    # JournalStorage file on a shared filesystem: journal:///abs/path/study.log (or a path ending .log/.journal).
    storage: Optional[str] = None
    # Optuna artifact store for each trial's grid (optuna-dashboard shows it on the trial page). None:
    # <study>/artifacts; with a shared storage, a folder every worker and the dashboard can reach.
    artifact_dir: Optional[str] = None
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
    # Set by the config build for a command without +sweep (``single_run_sweep``), not a setting: one
    # training run, a grid of one empty point identified by its whole config.
    single_run: bool = False
    seed: int = 0  # sampler seed
    # Command-line shortcuts for the common grid (dotted dict keys cannot be overridden from a shell):
    # sweep.learning_rates=[1e-5,1e-4] sweep.steps=[400,800] replace those two params' choices.
    learning_rates: Optional[list[float]] = None
    # Search samplers: when the method itself is swept, each method samples its lr from its own range
    # (textual inversion wants ~100x the lr of a full fine-tune).
    learning_rate_by_method: dict[str, ParamSpec] = field(default_factory=dict)
    # The same per model version, keyed <model>/<method> (sdxl/lora: SDXL LoRA wants a lower lr than SD 1.5
    # LoRA); it takes precedence over learning_rate_by_method for that pair, and both must be swept values.
    # One flat key rather than model -> method -> range: OmegaConf types a dict of dataclasses, not a dict of
    # dicts of them, so a typo in a range (lwo:) fails at start-up only this way.
    learning_rate_by_model_method: dict[str, ParamSpec] = field(default_factory=dict)
    steps: Optional[list[int]] = None


def single_run_sweep() -> SweepConfig:
    """Without +sweep, a single training run is a one-point study, so it lands in the same layout."""
    return SweepConfig(
        name="single", sampler="grid", params={}, isolation="inprocess", keep_best_k=-1, single_run=True
    )


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


def use_method_config(union: type) -> None:
    """``cfg.method`` becomes ``union``: the method union grown by a plugin's schema
    (``sdsweep.config.methods.register_method``). The annotation is a string resolved in this module, so
    rebinding the name and the field's default is what the schema and OmegaConf read."""
    global MethodConfig
    MethodConfig = union
    Config.__dataclass_fields__["method"].default_factory = union


def register_configs() -> None:
    load_plugins()  # plugin methods register their schema and their method=<name> entry first
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    # One schema per method (conf/method/<name>.yaml sets only its options), stored outside the method
    # group: a group's entries are choices (`method=...`, listed by --help), and a schema is not a method.
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(name=f"method_schema_{name}", node=schema)
    OmegaConf.register_new_resolver("data_tag", data_tag, replace=True)
