"""Grounders: transformers GroundingDINO and groundingdino-py (with its transformers-5 shim), on tiny random weights
loaded through their real loaders; crop → image mapping; caption and crop-box helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert
from transformers import BertConfig, BertModel

from spr_lightning.scoring import (
    Grounder,
    GroundingDinoPy,
    GroundingResult,
    HFGroundingDino,
    crop_image,
    format_caption,
    gdino_compat,
    ground_in_region,
    pixel_crop_box,
)
from spr_lightning.tiny.tokenizer_factory import build_bert_tokenizer

# groundingdino-py's own GroundingDINO_SwinT_OGC.py, shrunk where its builder allows. The backbone stays Swin-T:
# build_swin_transformer fixes the Swin dims per name and the ResNet option downloads torchvision weights.
# hidden_dim stays 256: the text enhancer hard-codes 256-d sine position features (transformer.py).
TINY_GDINO_PY_CONFIG = """\
batch_size = 1
modelname = "groundingdino"
backbone = "swin_T_224_1k"
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
return_interm_indices = [1, 2, 3]
backbone_freeze_keywords = None
enc_layers = 1
dec_layers = 1
pre_norm = False
dim_feedforward = 256
hidden_dim = 256
dropout = 0.0
nheads = 8
num_queries = 20
query_dim = 4
num_patterns = 0
num_feature_levels = 4
enc_n_points = 2
dec_n_points = 2
two_stage_type = "standard"
two_stage_bbox_embed_share = False
two_stage_class_embed_share = False
transformer_activation = "relu"
dec_pred_bbox_embed_share = True
dn_box_noise_scale = 1.0
dn_label_noise_ratio = 0.5
dn_label_coef = 1.0
dn_bbox_coef = 1.0
embed_init_tgt = True
dn_labelbook_size = 2000
max_text_len = 256
text_encoder_type = "bert-base-uncased"
use_text_enhancer = True
use_fusion_layer = True
use_checkpoint = False
use_transformer_ckpt = False
use_text_cross_attention = True
text_dropout = 0.0
fusion_dropout = 0.0
fusion_droppath = 0.0
sub_sentence_present = True
"""


def _tiny_bert_config(tokenizer) -> BertConfig:
    return BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)


def write_tiny_bert(folder: Path) -> Path:
    """A local BERT folder for ``text_encoder_type``: the tiny WordPiece tokenizer keeps BERT's fixed ids
    ([CLS]=101, [SEP]=102, '.'=1012, '?'=1029) that GroundingDINO's sub-sentence masks look up."""
    tokenizer = build_bert_tokenizer()
    torch.manual_seed(0)
    BertModel(_tiny_bert_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    # Noise, not flat colour: flat images give tied query scores, and ties make the order of detections arbitrary.
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def _sorted_rows(boxes: torch.Tensor) -> torch.Tensor:
    return boxes[torch.argsort(boxes[:, 0] * 1e6 + boxes[:, 1] * 1e3 + boxes[:, 2])]


def _assert_subset(small: GroundingResult, large: GroundingResult) -> None:
    for box in small.boxes:
        assert torch.isclose(large.boxes, box).all(dim=1).any(), f"{box} missing from the lower-threshold result"


def _check_monotone(grounder: Grounder, image: Image.Image, caption: str) -> GroundingResult:
    """Threshold 0 keeps every query; a higher threshold keeps a subset, all scoring above it. Returns the first."""
    low = grounder.ground(image, caption, box_threshold=0.0, text_threshold=0.25)
    assert len(low) == 20  # num_queries of both tiny models
    threshold = float(low.scores.median())  # random weights: put the cut where it must split the detections
    high = grounder.ground(image, caption, box_threshold=threshold, text_threshold=0.25)
    assert 0 < len(high) < len(low) and bool((high.scores > threshold).all())
    _assert_subset(high, low)
    return low


def _check_boxes_are_centre_size_of_the_image(result: GroundingResult, width: int, height: int) -> None:
    """Normalised ``cxcywh`` in [0, 1] maps to ``xyxy`` pixels with centres inside and sizes within the image."""
    cxcywh = box_convert(result.boxes, "xyxy", "cxcywh") / torch.tensor([width, height, width, height])
    assert result.boxes.dtype == torch.float32 and result.scores.shape == (len(result),)
    assert bool(((cxcywh >= -1e-5) & (cxcywh <= 1 + 1e-5)).all())


# --------------------------------------------------------------------------------------------- helpers


def test_format_caption():
    assert format_caption("A Red Cat ") == "a red cat."
    assert format_caption("two dogs.") == "two dogs."
    assert format_caption(["A cat", " a dog "]) == "a cat. a dog."


def test_pixel_crop_box_rounds_outwards_and_clips():
    assert pixel_crop_box((1.2, 2.7, 10.1, 20.0), (100, 100)) == (1, 2, 11, 20)
    assert pixel_crop_box((-5, -1, 120.5, 50.5), (100, 60)) == (0, 0, 100, 51)
    with pytest.raises(ValueError, match="no area"):
        pixel_crop_box((50, 50, 50, 60), (100, 100))
    crop, box = crop_image(Image.new("L", (30, 20)), (2.5, 3.5, 12.2, 13))
    assert crop.mode == "RGB" and crop.size == (11, 10) and box == (2, 3, 13, 13)


def test_grounding_result_validates_shapes():
    assert len(GroundingResult()) == 0
    with pytest.raises(ValueError, match="inconsistent"):
        GroundingResult(boxes=torch.zeros(2, 4), scores=torch.zeros(2), phrases=["a"])


class _FixedGrounder:
    """Returns one box in the frame of whatever image it is given, and records that image's size."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def ground(self, image, caption, box_threshold=0.35, text_threshold=0.25) -> GroundingResult:
        self.seen.append(image.size)
        return GroundingResult(torch.tensor([[1.0, 2.0, 5.0, 6.0]]), torch.tensor([0.9]), [format_caption(caption)])


def test_ground_in_region_maps_crop_pixels_back_to_image_pixels():
    grounder = _FixedGrounder()
    assert isinstance(grounder, Grounder)
    result = ground_in_region(grounder, Image.new("RGB", (100, 80)), (10.6, 20.2, 50.0, 60.9), "a cat")
    assert grounder.seen == [(40, 41)]  # the grounder ran on the whole-pixel crop (10, 20, 50, 61)
    torch.testing.assert_close(result.boxes, torch.tensor([[11.0, 22.0, 15.0, 26.0]]))
    assert result.phrases == ["a cat."]


# --------------------------------------------------------------------------------- transformers backend


@pytest.fixture(scope="module")
def hf_grounder() -> HFGroundingDino:
    return HFGroundingDino("tiny:grounding_dino")


def test_hf_grounder_boxes_scores_and_thresholds(hf_grounder):
    assert isinstance(hf_grounder, Grounder)
    image = _noise_image(90, 60, seed=0)  # not square: a swapped (h, w) target size would show
    result = _check_monotone(hf_grounder, image, "a red cat. a dog")
    _check_boxes_are_centre_size_of_the_image(result, 90, 60)
    nothing = hf_grounder.ground(image, "a red cat. a dog", box_threshold=1.0)  # sigmoid scores never exceed 1
    assert nothing.boxes.shape == (0, 4) and nothing.scores.shape == (0,) and nothing.phrases == []
    # the same detections, straight from the model: normalised cxcywh × (w, h, w, h)
    processor, model = hf_grounder.processor, hf_grounder.model
    inputs = processor(images=image, text="a red cat. a dog.", return_tensors="pt")
    with torch.no_grad():
        raw = model(**inputs).pred_boxes[0]
    expected = box_convert(raw, "cxcywh", "xyxy") * torch.tensor([90, 60, 90, 60])
    torch.testing.assert_close(result.boxes, expected, atol=1e-4, rtol=1e-5)
    assert all(isinstance(p, str) for p in result.phrases)


def test_hf_ground_batch_matches_single_images(hf_grounder):
    images = [_noise_image(64, 48, seed=1), _noise_image(64, 48, seed=2)]  # same size: no image padding
    captions = ["a red cat. a dog.", ["sky"]]
    batch = hf_grounder.ground_batch(images, captions, box_threshold=0.0)
    for result, image, caption in zip(batch, images, captions):
        single = hf_grounder.ground(image, caption, box_threshold=0.0)
        torch.testing.assert_close(_sorted_rows(result.boxes), _sorted_rows(single.boxes), atol=1e-3, rtol=1e-4)
    assert hf_grounder.ground_batch([], []) == []
    with pytest.raises(ValueError, match="captions"):
        hf_grounder.ground_batch(images, captions[:1])


def test_hf_ground_in_region(hf_grounder):
    image = _noise_image(120, 100, seed=3)
    region = ground_in_region(hf_grounder, image, (30, 20, 94, 68), "a cat", box_threshold=0.0)
    on_crop = hf_grounder.ground(image.crop((30, 20, 94, 68)), "a cat", box_threshold=0.0)
    torch.testing.assert_close(region.boxes, on_crop.boxes + torch.tensor([30.0, 20.0, 30.0, 20.0]))
    torch.testing.assert_close(region.scores, on_crop.scores)


# ------------------------------------------------------------------------ groundingdino-py and its shim


def test_shim_is_needed_and_makes_the_text_encoder_match_bert():
    from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper

    tokenizer = build_bert_tokenizer()
    torch.manual_seed(0)
    bert = BertModel(_tiny_bert_config(tokenizer)).eval()
    gdino_compat.revert()
    assert not gdino_compat.is_patched()
    if gdino_compat.needs_patch():  # transformers 5: the package's own wrapper cannot even be built
        with pytest.raises(AttributeError, match="get_extended_attention_mask"):
            BertModelWarper(bert_model=bert)
    assert gdino_compat.apply(force=True) and gdino_compat.is_patched()
    assert gdino_compat.apply()  # idempotent
    warper = BertModelWarper(bert_model=bert).eval()
    assert set(warper.state_dict()) == set(bert.state_dict())  # official `bert.*` keys still load
    tokens = tokenizer(["a red cat. a dog.", "sky."], padding="longest", return_tensors="pt")
    with torch.no_grad():
        ours = warper(**tokens)["last_hidden_state"]
        theirs = bert(**tokens).last_hidden_state
        # GroundingDINO's sub-sentence mask: [B, L, L]; all-ones on the valid tokens equals the 2-D mask
        square = tokens["attention_mask"][:, None, :].expand(-1, tokens["input_ids"].shape[1], -1)
        ours_3d = warper(input_ids=tokens["input_ids"], attention_mask=square)["last_hidden_state"]
    valid = tokens["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_3d[valid], theirs[valid], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gdino_py_files(tmp_path_factory) -> dict[str, str]:
    """Tiny config file, local BERT folder and a random ``{"model": state_dict}`` checkpoint, as released."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    root = tmp_path_factory.mktemp("gdino_py")
    config = root / "GroundingDINO_tiny.py"
    config.write_text(TINY_GDINO_PY_CONFIG)
    bert = write_tiny_bert(root / "bert")
    gdino_compat.apply()
    args = SLConfig.fromfile(str(config))
    args.text_encoder_type = str(bert)
    torch.manual_seed(0)
    model = build_model(args)
    checkpoint = root / "groundingdino_tiny.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    return {"config": str(config), "checkpoint": str(checkpoint), "bert": str(bert)}


@pytest.fixture(scope="module")
def gdino_py(gdino_py_files) -> GroundingDinoPy:
    return GroundingDinoPy(gdino_py_files["config"], gdino_py_files["checkpoint"], text_encoder=gdino_py_files["bert"],
                           device="cpu", image_size=64, max_size=128)


def test_gdino_py_loads_every_checkpoint_weight(gdino_py, gdino_py_files):
    assert gdino_compat.is_patched()
    assert not gdino_py.load_report.missing_keys and not gdino_py.load_report.unexpected_keys
    saved = torch.load(gdino_py_files["checkpoint"], map_location="cpu")["model"]
    loaded = gdino_py.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_gdino_py_boxes_scores_thresholds_and_region_mapping(gdino_py):
    assert isinstance(gdino_py, Grounder)
    image = _noise_image(90, 60, seed=4)
    result = _check_monotone(gdino_py, image, "a red cat. a dog")
    _check_boxes_are_centre_size_of_the_image(result, 90, 60)
    # the package's own predict on the package's own transform gives the same boxes, normalised cxcywh
    from groundingdino.util.inference import predict

    pixels, _ = gdino_py.transform(image, None)
    boxes, scores, _ = predict(gdino_py.model, pixels, "a red cat. a dog.", 0.0, 0.25, device="cpu")
    expected = box_convert(boxes * torch.tensor([90, 60, 90, 60]), "cxcywh", "xyxy")
    torch.testing.assert_close(result.boxes, expected)
    torch.testing.assert_close(result.scores, scores)
    region = ground_in_region(gdino_py, image, (10, 5, 70, 55), ["cat", "dog"], box_threshold=0.0)
    (on_crop,) = gdino_py.ground_batch([image.crop((10, 5, 70, 55))], ["cat. dog."], box_threshold=0.0)
    torch.testing.assert_close(region.boxes, on_crop.boxes + torch.tensor([10.0, 5.0, 10.0, 5.0]))
