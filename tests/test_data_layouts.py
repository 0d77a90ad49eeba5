"""Data in the layouts other trainers use (issue 27): sidecar captions with kohya repeat folders,
and Hugging Face datasets saved on disk (parquet with image bytes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep.data.examples import DataError, load_examples, split_examples, summarize_dataset


def write_image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)
    return path


def folder_cfg(folder: Path, *extra: str):
    return compose(TINY_OVERRIDES + ["data=imagefolder", f"data.path={folder}", *extra])


def kohya_folder(root: Path) -> Path:
    """kohya's layout: 10_sks dog/ (3 captioned images, one caption empty) and 2_dog/ (2 images)."""
    for i in range(3):
        write_image(root / "10_sks dog" / f"{i}.png", (10 * i, 0, 0))
        (root / "10_sks dog" / f"{i}.txt").write_text("" if i == 2 else f"sks dog, photo {i}\n")
    for i in range(2):
        write_image(root / "2_dog" / f"d{i}.jpg", (0, 10 * i, 0))
        (root / "2_dog" / f"d{i}.txt").write_text(f"a dog, number {i}")
    return root


def test_sidecar_captions_beside_images(tmp_path):
    for name, caption in [("a.png", "a red square"), ("b.png", "a blue\nsquare ")]:
        write_image(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(caption)
    examples = load_examples(folder_cfg(tmp_path, "data.num_heldout=0"))
    assert [(e.image_path.name, e.caption, e.repeats) for e in examples] == [
        ("a.png", "a red square", 1),
        ("b.png", "a blue square", 1),
    ]


def test_caption_extension_selects_the_sidecar(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from the caption file")
    (tmp_path / "a.txt").write_text("from the txt file")
    cfg = folder_cfg(tmp_path, "data.num_heldout=0", "data.caption_extension=.caption")
    assert [e.caption for e in load_examples(cfg)] == ["from the caption file"]


def test_kohya_repeat_folders_weight_sampling_and_appear_in_the_summary(tmp_path):
    cfg = folder_cfg(kohya_folder(tmp_path), "data.num_heldout=1")
    examples = load_examples(cfg)
    assert {e.image_path.parent.name: e.repeats for e in examples} == {"10_sks dog": 10, "2_dog": 2}
    assert sorted(e.caption for e in examples)[0] == ""  # the empty caption file is kept, as kohya does
    train, heldout = split_examples(examples, 1)
    assert len(heldout) == 1 and heldout[0].repeats in (10, 2)
    assert len(train) == sum(e.repeats for e in examples) - heldout[0].repeats
    text = summarize_dataset(cfg).describe()
    assert "sidecar captions (.txt)" in text
    assert "folder 10_sks dog: 10 repeat(s), 3 image(s)" in text
    assert "folder 2_dog: 2 repeat(s), 2 image(s)" in text
    assert "1 caption file(s) are empty" in text and "10_sks dog/2.txt" in text
    assert "4 used for training" in text  # images, not draws


def test_missing_sidecars_are_listed_or_fall_back_to_the_stated_caption(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("captioned")
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "c.png")
    with pytest.raises(DataError) as error:
        load_examples(folder_cfg(tmp_path, "data.num_heldout=0"))
    message = str(error.value)
    assert "2 image(s)" in message and "b.png, c.png" in message and "data.instance_prompt" in message
    cfg = folder_cfg(tmp_path, "data.num_heldout=0", "data.instance_prompt='a photo'")
    assert [e.caption for e in load_examples(cfg)] == ["captioned", "a photo", "a photo"]
    text = summarize_dataset(cfg).describe()
    assert "2 image(s) without a .txt file use data.instance_prompt" in text


def test_stray_files_and_folders_are_reported_as_skipped(tmp_path):
    kohya_folder(tmp_path)
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "unused").mkdir()
    text = summarize_dataset(folder_cfg(tmp_path, "data.num_heldout=0")).describe()
    assert "notes.md (not an image type" in text and "unused (a folder not named <repeats>_<name>" in text


# ---- Hugging Face datasets on disk ------------------------------------------------------------------
def pokemon_like(n: int, start: int = 0):
    """Rows shaped like the Pokémon BLIP captions set: an Image feature stored as PNG bytes, and text."""
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (32, 32), (40 * i, 200 - 20 * i, 90)) for i in range(start, start + n)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    texts = [f"a drawing of creature {i}" for i in range(start, start + n)]
    return datasets.Dataset.from_dict({"image": images, "text": texts}, features=features)


def hf_cfg(folder: Path, tmp_path: Path, *extra: str):
    return compose(
        TINY_OVERRIDES + ["data=hf", f"data.path={folder}", f"paths.cache={tmp_path / 'cache'}", *extra]
    )


def test_parquet_with_image_bytes_reads_through_datasets(tmp_path):
    folder = tmp_path / "pokemon"
    (folder / "data").mkdir(parents=True)
    pokemon_like(5).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    cfg = hf_cfg(folder, tmp_path, "data.num_heldout=1")
    examples = load_examples(cfg)
    assert [e.caption for e in examples] == [f"a drawing of creature {i}" for i in range(5)]
    assert all(e.image_path.is_file() and e.image_path.suffix == ".png" for e in examples)
    with Image.open(examples[2].image_path) as image:
        assert image.getpixel((0, 0)) == (80, 160, 90)
    assert load_examples(cfg)[0].image_path == examples[0].image_path  # same bytes, same file
    text = summarize_dataset(cfg).describe()
    assert "Hugging Face dataset (parquet files, split train)" in text and "4 used for training" in text


def test_save_to_disk_with_a_test_split_holds_out_from_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": pokemon_like(4), "test": pokemon_like(2, start=4)}).save_to_disk(
        str(folder)
    )
    examples = load_examples(hf_cfg(folder, tmp_path, "data.num_heldout=2"))
    train, heldout = split_examples(examples, 2)
    assert [e.caption for e in heldout] == ["a drawing of creature 4", "a drawing of creature 5"]
    assert [e.caption for e in train] == [f"a drawing of creature {i}" for i in range(4)]


def test_wrong_column_or_split_lists_what_exists(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": pokemon_like(3)}).save_to_disk(str(folder))
    with pytest.raises(DataError) as error:
        load_examples(hf_cfg(folder, tmp_path, "data.caption_column=caption", "data.num_heldout=0"))
    assert "'caption'" in str(error.value) and "['image', 'text']" in str(error.value)
    with pytest.raises(DataError, match=r"data.split=valid is not a split .* \['train'\]"):
        load_examples(hf_cfg(folder, tmp_path, "data.split=valid", "data.num_heldout=0"))


def test_fingerprint_sees_a_changed_sidecar_and_repeat_count(tmp_path):
    from sdsweep.sweep.fingerprint import describe_changes, study_fingerprint

    root = tmp_path / "data"
    for i in range(2):
        write_image(root / "10_sks" / f"{i}.png", (i, 0, 0))
        (root / "10_sks" / f"{i}.txt").write_text(f"sks {i}")
    cfg = folder_cfg(root, "data.num_heldout=0", f"paths.cache={tmp_path / 'cache'}")
    before = study_fingerprint(cfg)
    (root / "10_sks" / "1.txt").write_text("sks, recaptioned")
    (root / "10_sks").rename(root / "3_sks")
    changes = describe_changes(before, study_fingerprint(cfg))
    assert any("2 file(s) with new repeats" in line for line in changes), changes
    assert any("1 file(s) with a new caption: 1.png" in line for line in changes), changes


# ---- tag captions -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_shuffle_tags_is_seeded_per_draw_and_keeps_the_first_tokens(tmp_path):
    import torch

    from sdsweep.data.images import collate
    from sdsweep.data.latent_cache import build_training_dataset
    from sdsweep.models.loading import load_components
    from sdsweep.training.caption_dropout import TagShuffle, with_tag_shuffle
    from sdsweep.training.methods import get_method

    root = tmp_path / "tags"
    for i in range(2):
        write_image(root / f"{i}.png", (60 * i, 0, 0))
        (root / f"{i}.txt").write_text(f"sks, dog, red collar, grass, sunny day, photo {i}")
    extra = ["data.num_heldout=0", "data.shuffle_tags=true", "data.keep_tokens=1", f"paths.cache={tmp_path}"]
    cfg = folder_cfg(root, *extra)
    components = load_components(cfg, torch.device("cpu"))
    method = get_method(cfg.method.name)(cfg, components, torch.device("cpu"), tmp_path / "cache")
    method.prepare()
    examples, _ = split_examples(load_examples(cfg), 0)
    wrapped = with_tag_shuffle(cfg, build_training_dataset(cfg, components, method, examples, tmp_path / "c"))
    assert isinstance(wrapped, TagShuffle)
    captions = [wrapped[(0, draw)]["caption"] for draw in range(20)]
    assert all(c.startswith("sks, ") for c in captions)  # keep_tokens=1
    assert all(sorted(c.split(", ")) == sorted(captions[0].split(", ")) for c in captions)
    assert len(set(captions)) > 5  # the rest is shuffled per draw
    again = with_tag_shuffle(cfg, build_training_dataset(cfg, components, method, examples, tmp_path / "c"))
    assert [again[(0, draw)]["caption"] for draw in range(20)] == captions  # resume / other rank: same order
    item = wrapped[(1, 3)]
    assert "encoder_hidden_states" not in item  # the shuffled caption is encoded, not the cached one
    loss = method.compute_loss(collate([wrapped[(0, 0)], wrapped[(1, 0)]]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss if isinstance(loss, torch.Tensor) else loss[0]).all()
    with pytest.raises(Exception, match="data.keep_tokens"):
        folder_cfg(root, "data.keep_tokens=-1")


# ---- the shapes build in a log ----------------------------------------------------------------------
@pytest.mark.slow
def test_shapes_build_writes_plain_progress_and_no_torchvision_advice_to_a_log(tmp_path):
    """Issue 27 items 9 and 10: stderr is a file (not a TTY), as under nohup or CI."""
    import os
    import subprocess
    import sys

    code = (
        "from sdsweep.models import shapes, shapes_build\n"
        "plan = shapes.BuildPlan(vae_steps=3, vae_batch_size=2, clip_steps=3, unet_steps=3, batch_size=2,"
        " num_images=8)\n"
        f"shapes_build.build(__import__('pathlib').Path({str(tmp_path / 'model')!r}), plan)\n"
    )
    log = tmp_path / "build.log"
    with log.open("w") as stream:
        subprocess.run(
            [sys.executable, "-c", code],
            stdout=stream,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
    text = log.read_text()
    assert "\r" not in text  # no progress-bar redraws
    assert "building the shapes model (once): 9/9 steps" in text  # the closing plain line
    assert "requires torchvision" not in text
    assert (tmp_path / "model" / "model_index.json").is_file()
