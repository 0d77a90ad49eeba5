"""The preflight: everything a run needs is checked before any model loads (#12, #18)."""

from __future__ import annotations

import shutil

import pytest
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep.cli import UserError, preflight
from sdsweep.errors import ConfigError
from sdsweep.sweep.fingerprint import RESET_MARKER_ENV
from sdsweep.sweep.preflight import available_search_space


@pytest.fixture(autouse=True)
def _no_reset_marker(monkeypatch):
    monkeypatch.delenv(RESET_MARKER_ENV, raising=False)


def base(tmp_path, *extra: str) -> list[str]:
    return TINY_OVERRIDES + [f"paths.root={tmp_path / 'exp'}", *extra]


@pytest.mark.parametrize("part", ["vae", "tokenizer", "model_index.json"])
def test_an_incomplete_model_folder_is_named(tmp_path, tiny_model_dirs, part):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["sd15"], folder)
    target = folder / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(
        UserError, match=f"incomplete diffusers model folder: missing {part}|not a diffusers model"
    ):
        preflight(base(tmp_path, f"model.path={folder}"))
    assert not (tmp_path / "exp").exists()  # nothing written for a run that cannot start


def test_a_model_folder_without_weights_is_named(tmp_path, tiny_model_dirs):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["sd15"], folder)
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UserError, match="missing vae/ weights"):
        preflight(base(tmp_path, f"model.path={folder}"))


def test_a_missing_vae_path_is_named_before_any_model_loads(tmp_path, tiny_model_dirs, monkeypatch):
    """model.vae_path (SDXL's fp16-fix VAE): a missing or VAE-less local folder gets one error naming the key
    and the fix, from the preflight, before a weight is read; a VAE folder, or one holding vae/, passes."""
    from sdsweep.models import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the preflight loaded a model")

    monkeypatch.setattr(loading, "load_components", no_loading)
    for bad, said in ((tmp_path / "missing", "does not exist"), (tmp_path, "holds no AutoencoderKL")):
        with pytest.raises(
            UserError, match=rf"model.vae_path='{bad}' {said}.*set model.vae_path to"
        ) as error:
            preflight(base(tmp_path, f"model.vae_path={bad}"))
        assert str(error.value).count("model.vae_path=") == 1
    assert not (tmp_path / "exp").exists()
    for n, good in enumerate((tiny_model_dirs["sd15"], tiny_model_dirs["sd15"] / "vae")):
        preflight(base(tmp_path, f"model.vae_path={good}", f"study=vae{n}"))


def test_clip_model_missing_offline_is_named_before_any_model_loads(tmp_path):
    with pytest.raises(UserError, match=r"CLIP model 'openai/clip-vit-large-patch14' is not in the local"):
        preflight(base(tmp_path, "eval.clip_model=openai/clip-vit-large-patch14"))


def test_clip_is_not_needed_without_clip_metrics(tmp_path):
    preflight(base(tmp_path, "eval.clip_model=openai/clip-vit-large-patch14", "eval.metrics=[val_loss]"))


def test_safety_checker_missing_offline_is_named(tmp_path):
    with pytest.raises(UserError, match="safety checker 'CompVis/stable-diffusion-safety-checker'"):
        preflight(base(tmp_path, "eval.safety_checker=CompVis/stable-diffusion-safety-checker"))


def test_reference_dir_must_exist_and_hold_images(tmp_path):
    with pytest.raises(UserError, match="eval.reference_dir=.*does not exist"):
        preflight(base(tmp_path, f"eval.reference_dir={tmp_path / 'nowhere'}"))
    empty = tmp_path / "refs"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(UserError, match="holds no images"):
        preflight(base(tmp_path, f"eval.reference_dir={empty}"))
    Image.new("RGB", (16, 16)).save(empty / "a.png")
    preflight(base(tmp_path, f"eval.reference_dir={empty}"))


def test_a_corrupt_data_file_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16)).save(data / "good.png")
    (data / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    overrides = base(tmp_path, "data=instances", f"data.path={data}", "data.instance_prompt=a photo of sks")
    with pytest.raises(UserError, match=r"bad\.jpg is corrupt"):
        preflight(overrides + ["data.num_heldout=0"])


def test_preflight_prints_the_data_summary(tmp_path, capsys):
    preflight(base(tmp_path))
    out = capsys.readouterr().out
    assert "Data: 10 image(s) found" in out and "8 used for training, 2 held out" in out
    assert "training memory on cpu: predicted peak memory" in out  # known before any weights load


def test_unavailable_speedups_are_errors_before_training(tmp_path):
    # 8-bit Adam without bitsandbytes used to fall back to AdamW with a warning, and then OOM on a GPU.
    with pytest.raises((UserError, ConfigError), match="bitsandbytes"):
        preflight(base(tmp_path, "method.use_8bit_adam=true"))
    assert not (tmp_path / "exp").exists() or not list((tmp_path / "exp").rglob("*.safetensors"))


# ---- the whole search space (#18.1) -------------------------------------------------------------------
def test_every_unavailable_model_of_the_sweep_is_listed_in_one_error(tmp_path):
    with pytest.raises(UserError) as caught:
        preflight(base(tmp_path, "+sweep=methods"))
    message = str(caught.value)
    assert "model=sd15" in message and "model=sd21" in message
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "sweep.skip_unavailable=true" in message
    assert not (tmp_path / "exp").exists()


def test_available_search_space_keeps_only_what_is_available():
    cfg = compose(
        TINY_OVERRIDES
        + [
            "+sweep=methods",
            "sweep.params.model.choices=[tiny,sd15]",
            "sweep.params.method.choices=[lora,lorra]",
        ]
    )
    params, missing = available_search_space(cfg)
    assert params["model"].choices == ["tiny"]
    assert params["method"].choices == ["lora"]
    assert params["train.max_train_steps"] == cfg.sweep.params["train.max_train_steps"]
    assert sorted((m.key, m.value) for m in missing) == [("method", "lorra"), ("model", "sd15")]
    assert "conf/method/lorra.yaml" in next(m.reason for m in missing if m.value == "lorra")


def test_skip_unavailable_continues_with_the_available_values(tmp_path, capsys):
    overrides = base(tmp_path, "+sweep=methods", "sweep.params.model.choices=[tiny,sd15]")
    with pytest.raises(UserError, match="model=sd15"):
        preflight(overrides)
    preflight(overrides + ["sweep.skip_unavailable=true"])
    assert "leaving out model=sd15" in capsys.readouterr().out
    with pytest.raises(UserError, match="nothing is left to sweep over for model"):
        preflight(base(tmp_path, "+sweep=methods", "sweep.skip_unavailable=true"))


def test_a_command_line_option_of_another_method_is_rejected_even_at_its_default_value(tmp_path):
    """method.rank=4 is LoRA's default: judged by value it would pass; named on the command line it is a mistake."""
    with pytest.raises(ConfigError, match=r"method\.rank=4.*method=full has no option 'rank'.*method=lora"):
        preflight(base(tmp_path, "method=full", "method.rank=4"))
    assert not (tmp_path / "exp").exists()  # nothing written for a run that cannot start
