"""``RegionQueryDataModule``: annotated images → SPR region queries (one item per region) for generation.

Regions are sampled once in ``setup`` with :func:`~spr_lightning.regions.make_queries`' per-``(seed, image,
k)`` seeding, so every rank and every resumed run sees exactly the same regions in the same order; the
prompts of every template are rendered then too (cheap strings). Images are read in ``__getitem__``, in the
dataloader workers.

Under DDP, Lightning gives predict dataloaders its ``UnrepeatedDistributedSamplerWrapper``: every index goes
to exactly one rank, with no padding (unlike ``DistributedSampler``, which repeats samples to even out ranks).
That sampler asserts each rank gets at least one index, so when fewer regions than ranks are left (a resumed
run) the dataset is padded with empty placeholders that produce nothing.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from spr_lightning.coords import Codec, get_codec
from spr_lightning.regions import (
    DEFAULT_TEMPLATES,
    AnnotationIndex,
    PromptTemplate,
    Region,
    RegionObject,
    RegionSampler,
    RenderedPrompt,
    filter_annotations,
    load_annotations,
    make_queries,
    render_prompt,
)
from spr_lightning.shards import done_keys, sanitize_key

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


#: Default refusal threshold for image sizes: PIL's own ``Image.MAX_IMAGE_PIXELS`` default (~89.5 Mpx, what a
#: 0.25 GiB RGBA image holds). Dataset images are a few Mpx; anything far larger is a mistake or an attack.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


class ImageLoadError(ValueError):
    """An image of the annotation file is missing, unreadable or not the size the annotations say."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of any mode. 16/32-bit integer greyscale is scaled to 8 bits: PIL's own ``convert("RGB")``
    clips it at 255, which turns a 16-bit scan nearly white. Alpha is dropped, CMYK goes through PIL's
    conversion, palettes are expanded."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    return image.convert("RGB")  # a new image (a copy when already RGB): the file handle is closed after this


def open_rgb_image(
    source: str | Path | bytes,
    name: str | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    expected_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode an image file (or its bytes) to RGB, refusing what would be unsafe or silently wrong.

    * Size is read from the header and checked against ``max_pixels`` *before* any pixel is decoded, so a
      decompression bomb (a small file claiming 20000x20000 px) costs nothing. PIL's own guard
      (``Image.MAX_IMAGE_PIXELS``; an error beyond twice it) stays in force as well and is reported the same way.
    * A missing, truncated or corrupt file raises instead of yielding a half-grey image (PIL's
      ``LOAD_TRUNCATED_IMAGES`` stays off).
    * Pixels are read as stored. An EXIF orientation that rotates by 90 degrees is applied only when the
      annotated ``expected_size`` is the rotated size (annotations made in a viewer that honours EXIF); the
      orientations that keep the size (flips, 180 degrees) cannot be told apart and are read as stored.

    Raises:
        ImageLoadError: naming ``name`` (default: the path) and what is wrong.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<image bytes>")
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise ImageLoadError(f"image {name} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked just below
            handle = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with handle:
            width, height = handle.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    f"image {name} is {width}x{height} = {width * height} pixels, more than max_image_pixels="
                    f"{max_pixels}; refused before decoding (decompression-bomb guard). Raise max_image_pixels "
                    "if the image is genuine"
                )
            handle.load()
            image = handle
            swap = handle.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPS_SIDES and width != height
            if swap and expected_size is not None and tuple(expected_size) == (height, width):
                image = ImageOps.exif_transpose(handle)
            image = _to_rgb(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image {name} refused by PIL's decompression-bomb guard: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ImageLoadError(f"cannot read image {name}: {type(exc).__name__}: {exc}") from exc
    if expected_size is not None and image.size != tuple(expected_size):
        raise ImageLoadError(
            f"image {name} is {image.size[0]}x{image.size[1]} but the annotations say "
            f"{expected_size[0]}x{expected_size[1]}; its boxes would be wrong"
        )
    return image


@dataclass(frozen=True)
class RegionSpec:
    """One region to describe, without its pixels: what ``setup`` builds for every region.

    Attributes:
        region_id: ``f"{image_id}-{k}"``, the shard key of its candidates.
        image_id, file_name, image_size: the source image (``(width, height)``).
        region: the sampled region; its ``crop_box`` is rounded outwards to whole pixels, so the crop shown to
            the model and the box its answers are mapped back with are the same box.
        objects: the region's annotated objects (image pixels, labels).
        prompts: one rendered prompt per template, boxes written with the model's codec in the frame the model
            sees (the crop for crop templates).
        coord_format: the codec's name, checked by the generator against its own.
    """

    region_id: str
    image_id: int
    file_name: str
    image_size: tuple[int, int]
    region: Region
    objects: tuple[RegionObject, ...]
    prompts: tuple[RenderedPrompt, ...]
    coord_format: str


@dataclass
class RegionItem:
    """A :class:`RegionSpec` with its pixels, as the generator receives it.

    ``image`` is the full RGB image and ``crop`` the region's crop (``None`` when no template uses it);
    both are ``None`` and ``error`` says why when the image could not be read and ``on_error="skip"``.
    ``image_bytes`` is the file as stored when it is a JPEG that decodes to ``image`` as it is (see
    :func:`reusable_jpeg`): the candidate shard then stores those bytes, so scoring and DPO see the very pixels
    the policy generated from instead of a second JPEG compression of them.
    """

    spec: RegionSpec
    image: Image.Image | None
    crop: Image.Image | None
    error: str | None = None
    image_bytes: bytes | None = None


def pixel_crop_box(crop_box: Sequence[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``crop_box`` rounded outwards to whole pixels and clipped to the image (still holds the whole region)."""
    x1, y1, x2, y2 = crop_box
    width, height = image_size
    return (
        float(max(0, math.floor(x1))),
        float(max(0, math.floor(y1))),
        float(min(width, math.ceil(x2))),
        float(min(height, math.ceil(y2))),
    )


def resolve_templates(names: Sequence[str] | None) -> list[PromptTemplate]:
    """Templates by name from ``DEFAULT_TEMPLATES`` (all of them for ``None``), in the order given."""
    if names is None:
        return list(DEFAULT_TEMPLATES.values())
    unknown = [n for n in names if n not in DEFAULT_TEMPLATES]
    if unknown or not names:
        raise ValueError(f"unknown or no templates {list(names)}; available: {sorted(DEFAULT_TEMPLATES)}")
    return [DEFAULT_TEMPLATES[n] for n in names]


def build_region_specs(
    index: AnnotationIndex,
    sampler: RegionSampler,
    templates: Sequence[PromptTemplate],
    regions_per_image: int,
    seed: int,
    codec: Codec,
    coord_format: str,
) -> list[RegionSpec]:
    """Sample the regions (``make_queries`` seeding) and render every template for each.

    ``make_queries`` is asked for one template only, to get its regions: region sampling does not depend on the
    templates, and the prompts are rendered here against the region with its pixel-rounded crop box instead.
    """

    def encode(box: Sequence[float], frame_size: tuple[float, float]) -> str:
        return codec.encode(box, (round(frame_size[0]), round(frame_size[1])))

    specs = []
    for query in make_queries(index, sampler, templates[:1], regions_per_image, seed):
        region = replace(query.region, crop_box=pixel_crop_box(query.region.crop_box, query.image_size))
        prompts = tuple(render_prompt(t, region, query.objects, encode) for t in templates)
        specs.append(RegionSpec(query.region_id, query.image_id, query.file_name, query.image_size, region,
                                query.objects, prompts, coord_format))
    return specs


def reusable_jpeg(data: bytes, image: Image.Image) -> bytes | None:
    """``data`` when it is an RGB JPEG whose stored pixels are ``image`` (no EXIF rotation was applied on load),
    else ``None``: only then does decoding the bytes again give what the generator saw."""
    try:
        with Image.open(io.BytesIO(data)) as handle:
            same = handle.format == "JPEG" and handle.mode == "RGB" and handle.size == image.size
    except (OSError, SyntaxError, ValueError):
        return None
    return data if same else None


def load_image(path: Path, expected_size: tuple[int, int],
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Image.Image, bytes]:
    """``(RGB image, the file's bytes)``, the file read once; ``ImageLoadError`` naming the file when it is missing,
    corrupt, too large or the wrong size (see :func:`open_rgb_image`)."""
    try:
        data = path.read_bytes()
    except OSError:  # missing or unreadable: open_rgb_image says which, naming the file
        return open_rgb_image(path, str(path), max_pixels=max_pixels, expected_size=expected_size), b""
    return open_rgb_image(data, str(path), max_pixels=max_pixels, expected_size=expected_size), data


class RegionDataset(Dataset):
    """Map-style dataset of :class:`RegionItem`; indices past the specs (DDP padding) give ``None``."""

    def __init__(self, specs: list[RegionSpec], image_root: str | Path, on_error: OnError, length: int,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.specs = specs
        self.image_root = Path(image_root)
        self.on_error = on_error
        self.length = max(length, len(specs))
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> RegionItem | None:
        if index >= len(self.specs):
            return None
        spec = self.specs[index]
        path = self.image_root / spec.file_name
        try:
            image, data = load_image(path, spec.image_size, self.max_image_pixels)
        except ImageLoadError as exc:
            if self.on_error == "raise":
                raise
            return RegionItem(spec, None, None, error=str(exc))
        crop = image.crop(tuple(int(v) for v in spec.region.crop_box)) if any(p.uses_crop for p in spec.prompts) \
            else None
        return RegionItem(spec, image, crop, image_bytes=reusable_jpeg(data, image))


def collate_regions(items: list[RegionItem | None]) -> list[RegionItem]:
    """Keep items as a list (the generator renders them through the processor); drop DDP placeholders."""
    return [item for item in items if item is not None]


class RegionQueryDataModule(LightningDataModule):
    """Region queries of SPR §3.1 for ``python -m spr_lightning predict`` (candidate generation).

    Args:
        annotations: COCO-layout JSON (COCO, LVIS, Objects365; ``.json.gz`` too).
        image_root: folder the annotations' ``file_name`` s are relative to.
        coord_format: the model's box format (``spr_lightning.coords``); prompts write boxes with it. Must
            equal the generator's ``coord_format``.
        templates: prompt template names from ``DEFAULT_TEMPLATES`` (``None``: all), each rendered per region.
        regions_per_image: regions sampled per image (``k = 0 .. regions_per_image - 1``).
        seed: region sampling seed; with the image id and ``k`` it fixes each region.
        min_object_area: objects with a smaller box area are dropped (300 in SPR).
        min_objects: images need more than this many objects (8 in SPR).
        stop_prob: the sampler's random stop probability once a region is valid.
        batch_size: regions per ``predict_step`` (each gives ``len(templates)`` prompts).
        num_workers: dataloader workers reading images.
        skip_done_in: a ``ShardWriter`` output folder; regions whose keys it already holds are not generated
            again (resume). Point it at the same folder as the ShardWriter.
        max_images: use only the first this many images left after filtering (``None``: all).
        on_error: ``"raise"`` on a missing/corrupt image (the error names the file) or an invalid annotation;
            ``"skip"`` leaves such regions out and the generator counts and reports them.
        coord_options: codec options (e.g. ``qwen2_5_vl``'s ``resized_size``/``min_pixels``/``max_pixels``);
            must equal the generator's.
        max_image_pixels: images with more pixels (width x height, read from the header) are refused before
            decoding, as missing/corrupt ones are (``on_error``); ``None``: only PIL's own guard applies.
    """

    def __init__(
        self,
        annotations: str,
        image_root: str,
        coord_format: str,
        templates: list[str] | None = None,
        regions_per_image: int = 1,
        seed: int = 0,
        min_object_area: float = 300.0,
        min_objects: int = 8,
        stop_prob: float = 0.5,
        batch_size: int = 1,
        num_workers: int = 0,
        skip_done_in: str | None = None,
        max_images: int | None = None,
        on_error: OnError = "raise",
        coord_options: dict[str, Any] | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if regions_per_image < 1 or batch_size < 1:
            raise ValueError("regions_per_image and batch_size must be >= 1")
        self.annotations = annotations
        self.image_root = image_root
        self.coord_format = coord_format
        self.coord_options = dict(coord_options or {})
        self.codec = get_codec(coord_format, **self.coord_options)
        self.templates = resolve_templates(templates)
        self.regions_per_image = regions_per_image
        self.seed = seed
        self.min_object_area = min_object_area
        self.min_objects = min_objects
        self.sampler = RegionSampler(stop_prob=stop_prob)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_done_in = skip_done_in
        self.max_images = max_images
        self.on_error = on_error
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1 or None, got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels
        self.specs: list[RegionSpec] | None = None
        self.skipped_annotations = 0
        self.num_done = 0

    def build_index(self) -> AnnotationIndex:
        """The filtered annotation index (first ``max_images`` images)."""
        raw = load_annotations(self.annotations, on_error=self.on_error)
        self.skipped_annotations = raw.skipped
        if raw.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(raw.skip_reasons.items()))
            log.warning("%s: skipped %d invalid entries (on_error=skip): %s", self.annotations, raw.skipped, reasons)
        index = filter_annotations(raw, min_object_area=self.min_object_area, min_objects=self.min_objects)
        if self.max_images is not None:
            index = index.subset(index.image_ids[: self.max_images])
        return index

    def setup(self, stage: str) -> None:
        if self.specs is not None:
            return
        self._check_writer_folder()
        done = done_keys(self.skip_done_in) if self.skip_done_in else set()
        index = self.build_index()
        every = build_region_specs(index, self.sampler, self.templates, self.regions_per_image, self.seed,
                                   self.codec, self.coord_format)
        if not every:  # a run that would "succeed" writing nothing: an empty file or filters that drop everything
            raise ValueError(
                f"{self.annotations}: no region queries: {len(index)} images are left after filtering "
                f"(min_object_area={self.min_object_area}, more than min_objects={self.min_objects} objects; "
                f"{self.skipped_annotations} invalid entries skipped)"
            )
        self.specs = [s for s in every if sanitize_key(s.region_id) not in done]
        self.num_done = len(every) - len(self.specs)
        log.info("%s: %d images, %d regions (%d already written, %d to generate)",
                 self.annotations, len(index), len(every), self.num_done, len(self.specs))

    def _check_writer_folder(self) -> None:
        """Warn when a ShardWriter writes elsewhere than ``skip_done_in``: resume would then redo everything."""
        trainer = self.trainer
        for callback in getattr(trainer, "callbacks", []) or []:
            out = getattr(callback, "output_dir", None)
            if out is not None and getattr(callback, "prefix", None) is not None:
                if self.skip_done_in is None or Path(out).resolve() != Path(self.skip_done_in).resolve():
                    log.warning("ShardWriter writes to %s but skip_done_in is %s: regions already written will be "
                                "generated again (and then dropped by the writer)", out, self.skip_done_in)

    def _world_size(self) -> int:
        trainer = self.trainer
        return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Batches are PIL images and frozen specs, nothing to move: the generator builds and moves the tensors."""
        return batch

    def predict_dataloader(self) -> DataLoader:
        if self.specs is None:
            self.setup("predict")
        assert self.specs is not None
        world = self._world_size()
        # Lightning's predict sampler asserts every rank gets an index: pad with placeholders when needed.
        length = world if 0 < len(self.specs) < world else len(self.specs)
        dataset = RegionDataset(self.specs, self.image_root, self.on_error, length, self.max_image_pixels)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_regions, persistent_workers=False)
