"""Dataset listing, verification, splitting, transforms and collation on real image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep.data import (
    DataError,
    Example,
    ImageCaptionDataset,
    collate,
    load_examples,
    load_pil_images,
    split_examples,
)


def write_image(
    path: Path, size: tuple[int, int] = (40, 24), color: tuple[int, int, int] = (200, 30, 30)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def folder_cfg(folder: Path, *extra: str):
    return compose(TINY_OVERRIDES + ["data=imagefolder", f"data.path={folder}", *extra])


def test_demo_dataset_lists_every_image_with_its_caption(demo_data_dir):
    cfg = compose(TINY_OVERRIDES)
    examples = load_examples(cfg)
    rows = [json.loads(line) for line in (demo_data_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(examples) == cfg.data.demo_num_images == len(rows)
    assert [e.image_path.name for e in examples] == [r["file_name"] for r in rows]
    assert [e.caption for e in examples] == [r["text"] for r in rows]


def test_imagefolder_jsonl_resolves_relative_and_absolute_paths(tmp_path):
    data = tmp_path / "data"
    write_image(data / "sub" / "a.png")
    outside = write_image(tmp_path / "elsewhere" / "b.jpg")
    lines = [{"image": "sub/a.png", "caption": "first"}, {"image": str(outside), "caption": "second"}]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    examples = load_examples(folder_cfg(data))
    assert examples == [Example(data / "sub" / "a.png", "first"), Example(outside, "second")]


def test_imagefolder_csv_with_explicit_columns_and_caption_lists(tmp_path):
    data = tmp_path / "data"
    write_image(data / "x.png")
    (data / "metadata.csv").write_text("picture,words\nx.png,a red square\n")
    examples = load_examples(folder_cfg(data, "data.image_column=picture", "data.caption_column=words"))
    assert examples == [Example(data / "x.png", "a red square")]

    listed = tmp_path / "listed"
    write_image(listed / "y.png")
    (listed / "metadata.jsonl").write_text(
        json.dumps({"file_name": "y.png", "captions": ["one", "two"]}) + "\n"
    )
    assert load_examples(folder_cfg(listed))[0].caption == "one"


def test_wrong_explicit_column_lists_the_columns_that_exist(tmp_path):
    data = tmp_path / "data"
    write_image(data / "x.png")
    (data / "metadata.csv").write_text("file_name,text\nx.png,hello\n")
    with pytest.raises(DataError, match=r"'caption_text'.*\['file_name', 'text'\].*data.caption_column"):
        load_examples(folder_cfg(data, "data.caption_column=caption_text"))


def test_instances_use_every_image_with_the_instance_prompt(tmp_path):
    data = tmp_path / "dog"
    for name in ("b.jpg", "a.png", "notes.txt"):
        (write_image(data / name) if name != "notes.txt" else (data / name).write_text("not an image"))
    cfg = compose(
        TINY_OVERRIDES + ["data=instances", f"data.path={data}", "data.instance_prompt=a photo of sks dog"]
    )
    examples = load_examples(cfg)
    assert [e.image_path.name for e in examples] == ["a.png", "b.jpg"]
    assert {e.caption for e in examples} == {"a photo of sks dog"}


def test_missing_corrupt_and_empty_datasets_name_the_culprit(tmp_path):
    data = tmp_path / "data"
    write_image(data / "good.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"gone\.png.*Fix the path"):
        load_examples(folder_cfg(data))

    good = (data / "good.png").read_bytes()
    (data / "broken.png").write_bytes(good[: len(good) // 2])  # a truncated PNG
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "broken.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"broken\.png.*corrupt.*Replace or remove"):
        load_examples(folder_cfg(data))

    (data / "metadata.jsonl").write_text("\n")
    with pytest.raises(DataError, match="lists no images"):
        load_examples(folder_cfg(data))

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose(
        TINY_OVERRIDES + ["data=instances", f"data.path={empty}", "data.instance_prompt=a photo of sks"]
    )
    with pytest.raises(DataError, match="empty"):
        load_examples(cfg)


def test_uncaptioned_folder_suggests_instances(tmp_path):
    write_image(tmp_path / "data" / "a.png")
    with pytest.raises(DataError, match="data=instances"):
        load_examples(folder_cfg(tmp_path / "data"))


def test_split_is_deterministic_and_keeps_a_training_example():
    examples = [Example(Path(f"{i}.png"), f"caption {i}") for i in range(10)]
    train, heldout = split_examples(examples, 3)
    assert (train, heldout) == split_examples(list(examples), 3)
    assert len(heldout) == 3 and len(train) == 7 and set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(examples)
    assert split_examples(examples, 0) == (examples, [])
    assert len(split_examples(examples, 9)[0]) == 1
    with pytest.raises(DataError, match="num_heldout=10 leaves no training images"):
        split_examples(examples, 10)


@pytest.fixture
def striped_example(tmp_path) -> Example:
    """A 48x16 image: red left third, green middle, blue right third (non-square, asymmetric)."""
    array = np.zeros((16, 48, 3), dtype=np.uint8)
    array[:, :16, 0] = array[:, 16:32, 1] = array[:, 32:, 2] = 255
    path = tmp_path / "stripes.png"
    Image.fromarray(array).save(path)
    return Example(path, "stripes")


def test_center_crop_resizes_shorter_side_and_keeps_the_middle(striped_example):
    dataset = ImageCaptionDataset(
        [striped_example], resolution=8, center_crop=True, caption_transform=str.upper
    )
    item = dataset[0]
    pixels = item["pixel_values"]
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert item["caption"] == "STRIPES" and item["index"] == 0
    # The middle of a red|green|blue image is green.
    assert pixels[1].mean() > 0.9 and pixels[0].mean() < -0.9 and pixels[2].mean() < -0.9


def test_random_crop_and_flip_are_seeded_per_draw(striped_example):
    dataset = ImageCaptionDataset([striped_example], 8, center_crop=False, random_flip=True, seed=3)
    draws = [dataset[(0, draw)]["pixel_values"] for draw in range(16)]
    assert all(torch.equal(a, dataset[(0, d)]["pixel_values"]) for d, a in enumerate(draws))  # reproducible
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 2  # crops and flips vary between draws
    flipped = ImageCaptionDataset([striped_example], 8, center_crop=True, random_flip=True, seed=3)
    plain = ImageCaptionDataset([striped_example], 8, center_crop=True)[0]["pixel_values"]
    outcomes = [flipped[(0, d)]["pixel_values"] for d in range(16)]
    assert all(torch.equal(p, plain) or torch.equal(p, plain.flip(-1)) for p in outcomes)
    assert any(torch.equal(p, plain) for p in outcomes) and any(
        torch.equal(p, plain.flip(-1)) for p in outcomes
    )
    other_seed = ImageCaptionDataset([striped_example], 8, center_crop=False, random_flip=True, seed=4)
    assert any(not torch.equal(other_seed[(0, d)]["pixel_values"], draws[d]) for d in range(16))


def test_collate_stacks_tensors_and_lists_captions(striped_example):
    dataset = ImageCaptionDataset([striped_example, striped_example], 8)
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["captions"] == ["stripes", "stripes"]
    assert batch["index"].tolist() == [0, 1]
    cached = collate(
        [
            {
                "latents": torch.ones(4, 2, 2),
                "encoder_hidden_states": torch.zeros(77, 32),
                "caption": "c",
                "index": 5,
            }
        ]
        * 3
    )
    assert cached["latents"].shape == (3, 4, 2, 2) and cached["encoder_hidden_states"].shape == (3, 77, 32)
    assert "pixel_values" not in cached and cached["captions"] == ["c"] * 3


def test_load_pil_images_returns_rgb_images(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 7), 128).save(path)
    (image,) = load_pil_images([Example(path, "gray")])
    assert image.mode == "RGB" and image.size == (5, 7)
