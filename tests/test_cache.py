"""The latent/text cache against fresh encodes by the real tiny VAE and text encoder."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from conftest import TINY_OVERRIDES, compose

from sdsweep.data.examples import load_examples
from sdsweep.data.images import ImageCaptionDataset, collate, load_pil_images, resize_and_crop, to_tensor
from sdsweep.data.latent_cache import (
    FLIPPED,
    PLAIN,
    CachedLatentDataset,
    LatentCache,
    build_training_dataset,
    cache_key,
    split_parameters,
)
from sdsweep.models.loading import load_components
from sdsweep.training.methods import get_method

CPU = torch.device("cpu")


def make_cfg(*extra: str):
    return compose(TINY_OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def components():
    """Frozen tiny components of both flavours (never trained here, so safe to share)."""
    return {
        "sd15": load_components(make_cfg(), CPU),
        "sd21": load_components(make_cfg("model.pretrained=tiny:sd21"), CPU),
    }


@pytest.fixture(scope="module")
def examples():
    return load_examples(make_cfg())[:4]


def build(cfg, components, examples, cache_dir, method_name: str = "full"):
    method = get_method(method_name)(cfg, components, CPU, cache_dir)
    return build_training_dataset(cfg, components, method, examples, cache_dir)


@torch.no_grad()
def fresh_distribution(components, examples, flip: bool = False):
    pixels = torch.stack([to_tensor(resize_and_crop(image, 32)) for image in load_pil_images(examples)])
    return components.vae.encode(pixels.flip(-1) if flip else pixels).latent_dist


def test_cached_latents_and_text_equal_fresh_encodes(components, examples, tmp_path):
    sd15 = components["sd15"]
    dataset = build(make_cfg(), sd15, examples, tmp_path)
    assert isinstance(dataset, CachedLatentDataset)
    tensors = LatentCache(make_cfg(), sd15, tmp_path).load_or_encode(examples, [e.caption for e in examples])
    for variant, flip in ((PLAIN, False), (FLIPPED, True)):
        fresh = fresh_distribution(sd15, examples, flip)
        mean, std = split_parameters(tensors[variant])
        torch.testing.assert_close(mean, fresh.mean)
        torch.testing.assert_close(std, fresh.std)
    # A cached draw is exactly what the VAE's own sampler gives with the same generator.
    fresh = fresh_distribution(sd15, examples[1:2])
    expected = fresh.sample(generator=torch.Generator().manual_seed(7)) * sd15.latent_scaling
    drawn = dataset.sample_latents(1, flipped=False, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(drawn, expected[0])

    item = dataset[(2, 5)]
    assert item["latents"].shape == (4, 16, 16) and item["caption"] == examples[2].caption
    ids = sd15.tokenizer(
        [examples[2].caption],
        padding="max_length",
        max_length=sd15.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        text = sd15.text_encoder(ids, return_dict=False)[0][0]
    torch.testing.assert_close(item["encoder_hidden_states"], text)
    # Draws are reproducible and differ from draw to draw (VAE sampling noise kept).
    assert torch.equal(dataset[(2, 5)]["latents"], item["latents"])
    assert not torch.equal(dataset[(2, 6)]["latents"], item["latents"])
    batch = collate([dataset[(i, i)] for i in range(3)])
    assert batch["latents"].shape == (3, 4, 16, 16) and batch["encoder_hidden_states"].shape == (3, 77, 32)


def test_second_build_reuses_the_file_without_encoding(components, examples, tmp_path):
    cfg = make_cfg()
    build(cfg, components["sd15"], examples, tmp_path)
    (path,) = (tmp_path / "latents").glob("*.safetensors")
    mtime, calls = path.stat().st_mtime_ns, LatentCache.encode_calls
    second = build(cfg, components["sd15"], examples, tmp_path)
    assert LatentCache.encode_calls == calls
    assert path.stat().st_mtime_ns == mtime and len(list((tmp_path / "latents").iterdir())) == 1
    assert torch.equal(
        second[(0, 3)]["latents"], build(cfg, components["sd15"], examples, tmp_path)[(0, 3)]["latents"]
    )


def test_changed_image_resolution_or_model_gives_a_new_key_and_encodes_again(components, examples, tmp_path):
    cfg = make_cfg()
    captions = [e.caption for e in examples]
    base_key = cache_key(cfg, components["sd15"], examples, captions)
    build(cfg, components["sd15"], examples, tmp_path)

    # The key names what the VAE and text encoder hold, not their folder: the two tiny flavours share both
    # (byte for byte), so the second reuses the file; the same model copied elsewhere does too.
    assert cache_key(cfg, components["sd21"], examples, captions) == base_key
    copied = tmp_path / "elsewhere" / "model"
    shutil.copytree(components["sd15"].source, copied)
    moved = dataclasses.replace(components["sd15"], source=str(copied))
    assert cache_key(cfg, moved, examples, captions) == base_key
    # Another VAE (here: another config file in its folder) is another key, and encodes again.
    config = copied / "vae" / "config.json"
    config.write_text(config.read_text().replace("{", '{"_edited": true,', 1))
    assert cache_key(cfg, moved, examples, captions) != base_key
    calls = LatentCache.encode_calls
    build(cfg, moved, examples, tmp_path)
    assert LatentCache.encode_calls > calls
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == 2

    assert cache_key(make_cfg("data.resolution=16"), components["sd15"], examples, captions) != base_key
    calls = LatentCache.encode_calls
    low = build(make_cfg("data.resolution=16"), components["sd15"], examples, tmp_path)
    assert LatentCache.encode_calls > calls and low[0]["latents"].shape == (4, 8, 8)

    copies = tmp_path / "images"
    copies.mkdir()
    edited = []
    for example in examples:
        shutil.copy(example.image_path, copies / example.image_path.name)
        edited.append(type(example)(copies / example.image_path.name, example.caption))
    assert cache_key(cfg, components["sd15"], edited, captions) == base_key  # content, not paths
    image = load_pil_images(edited[:1])[0]
    image.putpixel((0, 0), (0, 0, 0) if image.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    image.save(edited[0].image_path)
    assert cache_key(cfg, components["sd15"], edited, captions) != base_key
    calls = LatentCache.encode_calls
    build(cfg, components["sd15"], edited, tmp_path)
    assert LatentCache.encode_calls > calls


def test_trained_text_encoder_caches_latents_only(components, examples, tmp_path):
    cfg = make_cfg("method.train_text_encoder=true")
    dataset = build(cfg, components["sd15"], examples, tmp_path)
    item = dataset[(0, 1)]
    assert "encoder_hidden_states" not in item and item["caption"] == examples[0].caption
    assert item["latents"].shape == (4, 16, 16)


@pytest.mark.parametrize("override", ["train.use_latent_cache=false", "data.center_crop=false"])
def test_pixel_dataset_when_the_cache_is_off_or_crops_are_random(components, examples, tmp_path, override):
    dataset = build(make_cfg(override), components["sd15"], examples, tmp_path)
    assert isinstance(dataset, ImageCaptionDataset)
    assert dataset[0]["pixel_values"].shape == (3, 32, 32)
    assert not (tmp_path / "latents").exists()
