"""Dataset listing, verification, splitting, transforms and collation on real image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep.data.examples import DataError, Example, load_examples, split_examples
from sdsweep.data.images import ImageCaptionDataset, collate, load_pil_images


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
        [striped_example], resolution=8, center_crop=True, caption_transform=lambda c, rng: c.upper()
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


# ---- robustness: encodings, image modes, bombs, layouts, the summary ----------------------------------
from sdsweep.data.examples import summarize_dataset  # noqa: E402
from sdsweep.data.images import open_rgb  # noqa: E402


def write_metadata(folder: Path, text: str, name: str, encoding: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(text.encode(encoding))


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp1252", "latin-1", "utf-16"])
def test_metadata_in_every_common_encoding_reads_the_same_captions(tmp_path, name, encoding):
    data = tmp_path / "data"
    write_image(data / "a.png")
    caption = "a photo of sks café"
    if name.endswith(".csv"):
        text = f"file_name,text\na.png,{caption}\n"
    else:
        text = json.dumps({"file_name": "a.png", "text": caption}, ensure_ascii=False) + "\n"
    write_metadata(data, text, name, encoding)
    examples = load_examples(folder_cfg(data, "data.num_heldout=0"))
    assert [(e.image_path.name, e.caption) for e in examples] == [("a.png", caption)]
    summary = summarize_dataset(folder_cfg(data, "data.num_heldout=0"))
    if encoding in ("cp1252", "latin-1"):
        assert any("not UTF-8" in note for note in summary.notes)
    else:
        assert not summary.notes


def test_binary_metadata_is_refused_by_name(tmp_path):
    data = tmp_path / "data"
    write_image(data / "a.png")
    (data / "metadata.csv").write_bytes(b"file_name,text\n\x00\xff\xfe\x81garbage\n")
    with pytest.raises(DataError, match=r"metadata\.csv.*UTF-8"):
        load_examples(folder_cfg(data))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(open_rgb(path))


def test_16_bit_and_float_images_are_scaled_not_clipped_to_white(tmp_path):
    ramp16 = np.tile(np.linspace(0, 65535, 16, dtype=np.uint16), (8, 1))
    Image.fromarray(ramp16, mode="I;16").save(tmp_path / "i16.png")
    Image.fromarray(ramp16.astype(np.int32), mode="I").save(tmp_path / "i32.tif")
    Image.fromarray((ramp16 / 65535.0).astype(np.float32), mode="F").save(tmp_path / "f.tif")
    for name in ("i16.png", "i32.tif", "f.tif"):
        pixels = _pixels(tmp_path / name)
        assert pixels.shape == (8, 16, 3), name
        assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255, name
        assert 100 < pixels[0, 8, 0] < 155, name  # the middle of the ramp stays mid-grey


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_pil_mode_opens_as_8_bit_rgb(tmp_path, mode):
    suffix = ".tif" if mode in ("CMYK", "I", "F") else ".png"
    path = tmp_path / f"img{suffix}"
    Image.new(mode, (12, 10)).save(path)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (12, 10)


def test_tif_gif_and_jpeg_are_accepted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(data / "a.tif")
    Image.new("P", (20, 20)).save(data / "b.gif")
    Image.new("RGB", (20, 20)).save(data / "c.jpg")
    (data / "notes.txt").write_text("not an image")
    cfg = compose(
        TINY_OVERRIDES + ["data=instances", f"data.path={data}", "data.instance_prompt=a photo of sks"]
    )
    assert sorted(e.image_path.name for e in load_examples(cfg)) == ["a.tif", "b.gif", "c.jpg"]
    summary = summarize_dataset(cfg)
    assert summary.skipped == [("notes.txt", "not an image type sdsweep reads (.txt)")]
    assert "notes.txt" in summary.describe()


def test_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_image(data / "huge.png", size=(200, 200))
    write_image(data / "ok.png")
    (data / "metadata.jsonl").write_text(
        '{"file_name": "ok.png", "text": "x"}\n{"file_name": "huge.png", "text": "y"}\n'
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200x200 = 40,000 pixels: a bomb here
    with pytest.raises(DataError, match=r"huge\.png.*too large"):
        load_examples(folder_cfg(data))


def test_hugging_face_train_split_layout_is_found(tmp_path):
    data = tmp_path / "dataset"
    write_image(data / "train" / "a.png")
    write_image(data / "train" / "b.png")
    (data / "train" / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "one"}\n{"file_name": "b.png", "text": "two"}\n'
    )
    cfg = folder_cfg(data, "data.num_heldout=1")
    assert [e.caption for e in load_examples(cfg)] == ["one", "two"]
    summary = summarize_dataset(cfg)
    assert (summary.found, summary.used, summary.heldout) == (2, 1, 1)
    assert "train split" in summary.describe()


def test_summary_counts_unlisted_images_and_long_captions_once(tmp_path):
    data = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png", "stray.png"):
        write_image(data / name)
    long = "a photo of sks " + " ".join(["very"] * 90)
    rows = [{"file_name": n, "text": t} for n, t in (("a.png", long), ("b.png", long), ("c.png", "short"))]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize_dataset(folder_cfg(data, "data.num_heldout=1"))
    assert (summary.found, summary.used, summary.heldout) == (3, 2, 1)
    assert summary.skipped == [("stray.png", "not listed in the metadata")]
    assert summary.long_captions == ["a.png", "b.png"]
    text = summary.describe()
    assert text.count("longer than 77 tokens") == 1 and "stray.png" in text
