"""Bad images: missing, truncated, corrupt, odd modes, EXIF-rotated, tiny and decompression bombs — in the
generation data, the scoring data (shard images) and the evaluation data (``docs/reliability.md``)."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fixtures_coco import write_coco_fixture
from fixtures_grounding import write_refcoco_fixture
from PIL import Image

from callbacks import ShardWriter
from datamodules.candidates import CandidateDataModule
from datamodules.grounding import RefCOCODataModule
from datamodules.regions import ImageLoadError, RegionQueryDataModule, collate_regions, open_rgb_image
from spr_lightning.generation import CandidateGenerator
from spr_lightning.rewarding import PreferenceBuilder, format_summary
from spr_lightning.shards import SCHEMA_VERSION, ShardFormatError


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that *claims* ``width x height`` RGB pixels in a few dozen bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def picture(size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, (30, 60, 90))
    image.paste((220, 30, 30), (4, 4, 20, 16))
    return image


def damaged(kind: str) -> bytes:
    if kind == "truncated_jpeg":
        data = encoded(picture((256, 192)), "JPEG", quality=95)
        return data[: len(data) // 2]
    if kind == "truncated_png":
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype=np.uint8))
        data = encoded(noise, "PNG")
        return data[: len(data) // 2]
    if kind == "corrupt":
        return b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4
    if kind == "empty":
        return b""
    if kind == "bomb_20000px":
        return png_header_only(20000, 20000)
    raise AssertionError(kind)


DAMAGE = ["truncated_jpeg", "truncated_png", "corrupt", "empty", "bomb_20000px"]


# ------------------------------------------------------------------------------------------- the loader
@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_image_raises_naming_the_file(tmp_path, kind):
    path = tmp_path / f"img_{kind}.bin"
    path.write_bytes(damaged(kind))
    with pytest.raises(ImageLoadError, match=rf"img_{kind}\.bin"):
        open_rgb_image(path)
    with pytest.raises(ImageLoadError, match=rf"img_{kind}\.bin"):
        open_rgb_image(path, max_pixels=None)  # PIL's own bomb guard still stands behind ours


def test_missing_file_raises_naming_it(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nowhere\.jpg does not exist"):
        open_rgb_image(tmp_path / "nowhere.jpg")


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(encoded(picture((200, 100)), "PNG"))
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or None)
    with pytest.raises(ImageLoadError, match=r"200x100 = 20000 pixels, more than max_image_pixels=19999"):
        open_rgb_image(path, max_pixels=19_999)
    assert decoded == []  # refused on the header alone
    monkeypatch.undo()
    assert open_rgb_image(path, max_pixels=20_000).size == (200, 100)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG"),
     ("I;16", "PNG")],
)
def test_every_mode_arrives_as_rgb_of_the_right_size(tmp_path, mode, fmt):
    if mode == "I;16":
        source = Image.fromarray(np.full((30, 40), 32896, dtype=np.uint16))  # 128 * 257
    else:
        source = picture((40, 30)).convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(encoded(source, fmt))
    assert Image.open(path).mode == mode
    image = open_rgb_image(path, expected_size=(40, 30))
    assert image.mode == "RGB" and image.size == (40, 30)
    if mode == "I;16":
        # PIL's own convert("RGB") clips 16-bit values at 255 (a white image); they are scaled instead.
        assert Image.open(path).convert("RGB").getpixel((0, 0)) == (255, 255, 255)
        assert image.getpixel((0, 0)) == (128, 128, 128)
    else:
        expected = source.convert("RGB").getpixel((10, 8))  # inside the red patch
        tolerance = 12 if fmt == "JPEG" else 0
        assert max(abs(a - b) for a, b in zip(image.getpixel((10, 8)), expected)) <= tolerance


def _exif_jpeg(path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    picture((40, 20)).save(path, format="JPEG", exif=exif.tobytes(), quality=95)


def test_exif_rotation_applied_only_when_the_annotations_are_in_the_rotated_frame(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, 6)  # stored 40x20, shown rotated 90 degrees: 20x40
    assert open_rgb_image(path, expected_size=(40, 20)).size == (40, 20)  # annotated as stored: as stored
    rotated = open_rgb_image(path, expected_size=(20, 40))  # annotated as shown: rotated like the viewer
    assert rotated.size == (20, 40)
    assert rotated.getpixel((20 - 1 - 8, 8))[0] > 150  # the red patch at stored (4..20, 4..16) moved top-right
    with pytest.raises(ImageLoadError, match=r"40x20 but the annotations say 30x30"):
        open_rgb_image(path, expected_size=(30, 30))
    flipped = tmp_path / "flipped.jpg"
    _exif_jpeg(flipped, 3)  # 180 degrees keeps the size: cannot be told apart, read as stored
    assert open_rgb_image(flipped, expected_size=(40, 20)).getpixel((8, 8))[0] > 150


def test_one_pixel_image_loads(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    image = open_rgb_image(path, expected_size=(1, 1))
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------------- generation data
@pytest.mark.parametrize("kind", ["truncated_jpeg", "bomb_20000px"])
def test_generation_raises_naming_the_image_or_skips_and_counts(tmp_path, kind, caplog):
    coco = write_coco_fixture(tmp_path / "coco", num_images=2, seed=1)
    first = sorted(coco.image_root.iterdir())[0]
    first.write_bytes(damaged(kind))
    data = RegionQueryDataModule(str(coco.annotations), str(coco.image_root), "ferret", templates=["region"])
    data.setup("predict")
    with pytest.raises(ImageLoadError, match=first.name):
        data.predict_dataloader().dataset[0]
    skipping = RegionQueryDataModule(str(coco.annotations), str(coco.image_root), "ferret", templates=["region"],
                                     on_error="skip")
    skipping.setup("predict")
    batch = collate_regions([skipping.predict_dataloader().dataset[i] for i in range(2)])
    assert batch[0].error is not None and first.name in batch[0].error and batch[1].error is None
    generator = CandidateGenerator("tiny:llava", "ferret")
    with caplog.at_level(logging.WARNING, logger="spr_lightning.generation"):
        assert generator.predict_step(batch[:1]) == []
    assert generator.stats["failed"] == 1 and first.name in caplog.text


def test_generation_pixel_limit_is_a_config_field(tmp_path):
    coco = write_coco_fixture(tmp_path / "coco", num_images=1, seed=1)
    data = RegionQueryDataModule(str(coco.annotations), str(coco.image_root), "ferret", templates=["region"],
                                 max_image_pixels=160 * 120 - 1)
    data.setup("predict")
    with pytest.raises(ImageLoadError, match=r"more than max_image_pixels=19199"):
        data.predict_dataloader().dataset[0]
    with pytest.raises(ValueError, match="max_image_pixels"):
        RegionQueryDataModule(str(coco.annotations), str(coco.image_root), "ferret", max_image_pixels=0)


# ------------------------------------------------------------------------------------ scoring data
def _candidate(key: str) -> dict:
    return {"schema": SCHEMA_VERSION, "query_id": key, "image_id": 1, "image_size": [64, 48],
            "region": [0, 0, 64, 48], "prompt": "Describe [0, 0, 999, 999].", "candidates": ["a box", "b box"],
            "coord_format": "ferret", "objects": []}


def _write_candidates(out: Path, samples: dict[str, tuple[str, bytes]]) -> Path:
    writer = ShardWriter(str(out), prefix="candidates", samples_per_shard=10).start(0)
    for key, (ext, data) in samples.items():
        writer.write_sample({"__key__": key, "json": _candidate(key), ext: data})
    writer.finish()
    return out


def _samples(module: CandidateDataModule) -> list[dict]:
    return [s for batch in module.predict_dataloader() for s in batch]


def test_scoring_bad_images_name_shard_and_key_or_are_skipped_counted_and_reported(tmp_path, caplog):
    cands = _write_candidates(tmp_path / "cands", {"good": ("jpg", encoded(picture(), "JPEG")),
                                                   "cut": ("jpg", damaged("truncated_jpeg")),
                                                   "bomb": ("png", damaged("bomb_20000px"))})
    with pytest.raises(ShardFormatError, match=r"candidates-r000-000000\.tar: sample 'cut'"):
        _samples(CandidateDataModule(str(cands), batch_size=4))
    bomb = _write_candidates(tmp_path / "bomb", {"bomb": ("png", damaged("bomb_20000px"))})
    with pytest.raises(ShardFormatError, match=r"candidates-r000-000000\.tar: sample 'bomb'.*decompression-bomb"):
        _samples(CandidateDataModule(str(bomb), batch_size=4, max_image_pixels=None))
    small = _write_candidates(tmp_path / "small", {"big": ("jpg", encoded(picture(), "JPEG"))})
    with pytest.raises(ShardFormatError, match=r"sample 'big'.*more than max_image_pixels=100"):
        _samples(CandidateDataModule(str(small), max_image_pixels=100))

    samples = _samples(CandidateDataModule(str(cands), batch_size=4, on_error="skip"))
    assert [s["__key__"] for s in samples] == ["good", "cut", "bomb"]
    assert "error" not in samples[0] and "'cut'" in samples[1]["error"] and "'bomb'" in samples[2]["error"]

    builder = PreferenceBuilder(semantic_scorer=None, grounder=None)
    with caplog.at_level(logging.WARNING, logger="spr_lightning.rewarding"):
        builder.predict_step(samples, 0)
    assert builder.counts["skipped"] == 2 and builder.counts["queries"] == 1
    assert "'cut'" in caplog.text and "'bomb'" in caplog.text
    summary = {**dict.fromkeys(["queries", "pairs", "ties", "too_few", "candidates", "chosen_total",
                                "rejected_total", "chosen_loc", "rejected_loc", "refine_snapped", "refine_kept",
                                "refine_unmatched", "refine_duplicates"], 0.0), "skipped": 2.0}
    assert "2 unreadable samples skipped" in format_summary(summary)


# --------------------------------------------------------------------------------- evaluation data
@pytest.mark.parametrize("kind", ["truncated_jpeg", "bomb_20000px"])
def test_evaluation_bad_image_raises_naming_the_sample(tmp_path, kind):
    fixture = write_refcoco_fixture(tmp_path)
    target = Path(fixture["image_root"]) / fixture["val"][0]["file_name"]
    target.write_bytes(damaged(kind))
    module = RefCOCODataModule(fixture["annotations"], fixture["image_root"], num_workers=0)
    module.setup()
    with pytest.raises(ValueError, match=rf"sample '101-0'.*{target.name}"):
        module.dataset[0]


def test_evaluation_pixel_limit_is_a_config_field(tmp_path):
    fixture = write_refcoco_fixture(tmp_path)
    module = RefCOCODataModule(fixture["annotations"], fixture["image_root"], num_workers=0,
                               max_image_pixels=96 * 64 - 1)
    module.setup()
    with pytest.raises(ValueError, match=r"sample '101-0'.*more than max_image_pixels=6143"):
        module.dataset[0]
    assert json.loads(Path(fixture["annotations"]).read_text())[0]["width"] == 96
