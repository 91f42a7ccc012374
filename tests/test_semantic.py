"""SemanticScorer (SPR Eq. 1-2) and the local-attention pooling step, on the tiny open_clip ViT and tiny towers."""

from __future__ import annotations

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from PIL import Image

from spr_lightning.scoring import (
    SemanticScorer,
    check_local_attention_support,
    encode_image_local,
    pad_to_square,
    region_patch_mask,
)


@pytest.fixture(scope="module")
def scorer() -> SemanticScorer:
    return SemanticScorer("tiny:open_clip", alpha=5.0)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _reference_local(visual: VisionTransformer, pixels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The definition, run through open_clip's own blocks: the class token's attention row in the LAST block is
    masked to {cls} ∪ kept patches (full [B·heads, L, L] mask, other rows untouched), then ln_post + proj."""
    x = visual._embeds(pixels)
    *first, last = visual.transformer.resblocks
    for block in first:
        x = block(x)
    batch, length, _ = x.shape
    heads = last.attn.num_heads
    mask = torch.zeros(batch, length, length)
    mask[:, 0, 1:] = torch.where(keep, 0.0, float("-inf"))
    x = last(x, attn_mask=mask.repeat_interleave(heads, dim=0))
    return visual.ln_post(x[:, 0]) @ visual.proj


def test_pad_to_square_centres_the_image_on_the_fill_colour():
    image = Image.new("RGB", (10, 4), (255, 0, 0))
    square, offset = pad_to_square(image, (1, 2, 3))
    assert square.size == (10, 10) and offset == (0, 3)
    assert square.getpixel((5, 1)) == (1, 2, 3) and square.getpixel((5, 3)) == (255, 0, 0)
    assert square.getpixel((9, 6)) == (255, 0, 0) and square.getpixel((9, 7)) == (1, 2, 3)
    same, offset = pad_to_square(Image.new("RGB", (6, 6)), (0, 0, 0))
    assert same.size == (6, 6) and offset == (0, 0)


def test_region_patch_mask_centre_rule():
    grid = (4, 4)  # patch centres at 0.125, 0.375, 0.625, 0.875
    assert region_patch_mask((0, 0, 1, 1), grid).all()
    left_half = region_patch_mask((0, 0, 0.5, 1), grid).view(4, 4)
    assert left_half[:, :2].all() and not left_half[:, 2:].any()
    # the box edge passes exactly through a centre: closed interval, the patch is in
    assert region_patch_mask((0.375, 0.375, 0.375, 0.375), grid).view(4, 4)[1, 1]
    # no centre inside a box smaller than a patch: the patch holding the box centre is kept, only it
    tiny = region_patch_mask((0.51, 0.76, 0.55, 0.8), grid).view(4, 4)
    assert tiny.sum() == 1 and tiny[3, 2]
    # row-major: a box on the first row keeps the first `cols` tokens
    assert region_patch_mask((0, 0, 1, 0.2), grid).nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_local_attention_with_the_whole_image_equals_encode_image(scorer):
    square, keep = scorer.local_inputs(_image(40, 40), (0, 0, 40, 40))
    assert keep.all()
    pixels = scorer._pixels([square])
    full = scorer.model.encode_image(pixels)
    local = encode_image_local(scorer.model.visual, pixels, keep[None])
    torch.testing.assert_close(local, full, atol=1e-5, rtol=1e-5)


def test_local_attention_matches_the_masked_last_block_definition(scorer):
    images = [_image(48, 32, seed=1), _image(30, 50, seed=2)]
    inputs = [scorer.local_inputs(im, r) for im, r in zip(images, [(0, 0, 20, 16), (10, 20, 30, 50)])]
    pixels = scorer._pixels([sq for sq, _ in inputs])
    keep = torch.stack([k for _, k in inputs])
    assert not keep.all(dim=1).any()
    local = encode_image_local(scorer.model.visual, pixels, keep)
    torch.testing.assert_close(local, _reference_local(scorer.model.visual, pixels, keep), atol=1e-5, rtol=1e-5)
    assert (local - scorer.model.encode_image(pixels)).abs().max() > 1e-3  # the mask changes the embedding


def test_region_maps_through_the_padding(scorer):
    # 32x16 image padded to 32x32 (rows 8..24 hold the image); tiny grid is 4x4 patches of 8 px
    _, keep = scorer.local_inputs(_image(32, 16), (0, 0, 32, 16))
    grid = keep.view(4, 4)
    assert grid[1:3].all() and not grid[0].any() and not grid[3].any()


@pytest.mark.parametrize("pooling", ["attn_pool", "avg"])
def test_other_pooling_towers(pooling):
    torch.manual_seed(0)
    kwargs = {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}
    kwargs = kwargs if pooling == "attn_pool" else {"pool_type": "avg"}
    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                               output_dim=16, **kwargs).eval()
    pixels = torch.randn(2, 3, 32, 32)
    all_patches = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(encode_image_local(visual, pixels, all_patches), visual(pixels), atol=1e-5,
                                   rtol=1e-5)
        some = region_patch_mask((0, 0, 0.5, 0.5), (4, 4)).expand(2, -1)
        assert (encode_image_local(visual, pixels, some) - visual(pixels)).abs().max() > 1e-4


def test_unsupported_towers_are_refused():
    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=64, width=8)
    with pytest.raises(TypeError, match="VisionTransformer"):
        check_local_attention_support(resnet)
    custom = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                               output_dim=16, qk_norm=True)
    with pytest.raises(TypeError, match="custom"):
        check_local_attention_support(custom)
    with pytest.raises(ValueError, match="patch_keep"):
        encode_image_local(VisionTransformer(32, 8, 32, 1, 2, 2.0, output_dim=16), torch.randn(1, 3, 32, 32),
                           torch.ones(1, 4, dtype=torch.bool))


def test_crop_is_padded_not_centre_cropped(scorer):
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 64, 16))  # a wide red band: the crop (0, 0, 64, 16) is 4:1
    square = pad_to_square(image.crop((0, 0, 64, 16)), scorer.fill)[0]
    pixels = scorer._pixels([square])[0]
    # rows of the padding normalise to ~0 (mean colour); the band is kept whole across the full width
    assert pixels[:, :8].abs().max() < 0.05 and pixels[:, -8:].abs().max() < 0.05
    assert (pixels[0, 13:19] > 1.5).all()


def test_score_is_alpha_times_cosine_and_averages_crop_and_local(scorer):
    images, regions, crops = [_image(48, 40, 3)], [(8, 8, 32, 28)], [(2, 3, 38, 33)]
    texts = [["a red square", "two dogs on grass", "x"]]
    (out,) = scorer.score(images, regions, crops, texts)
    t = scorer.encode_texts(texts[0])
    expected_crop = 5.0 * torch.nn.functional.cosine_similarity(t, scorer.encode_crops(images, crops))
    expected_local = 5.0 * torch.nn.functional.cosine_similarity(t, scorer.encode_local(images, regions))
    torch.testing.assert_close(out["crop"], expected_crop)
    torch.testing.assert_close(out["local"], expected_local)
    torch.testing.assert_close(out["sem"], (expected_crop + expected_local) / 2)
    assert out["sem"].shape == (3,) and out["sem"].abs().max() <= 5.0 + 1e-5
    scorer.alpha = 1.0
    try:
        torch.testing.assert_close(scorer.score(images, regions, crops, texts)[0]["sem"], out["sem"] / 5)
    finally:
        scorer.alpha = 5.0


def test_score_batches_queries_like_scoring_each_alone(scorer):
    images = [_image(48, 40, 4), _image(32, 60, 5), _image(50, 50, 6)]
    regions = [(0, 0, 24, 20), (4, 10, 28, 50), (10, 10, 40, 40)]
    crops = [(0, 0, 36, 30), (0, 0, 32, 60), (2, 2, 48, 48)]
    long_text = "a very long description " * 60  # far beyond the 77-token context: truncated, not an error
    texts = [["a cat", long_text], [], ["blue sky", "a tree", "grass"]]
    together = scorer.score(images, regions, crops, texts)
    scorer.image_batch_size, scorer.text_batch_size = 1, 2
    try:
        alone = [scorer.score([im], [r], [c], [t])[0] for im, r, c, t in zip(images, regions, crops, texts)]
    finally:
        scorer.image_batch_size, scorer.text_batch_size = 32, 256
    assert [len(o["sem"]) for o in together] == [2, 0, 3]
    for a, b in zip(together, alone):
        for key in ("sem", "crop", "local"):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(together[0]["sem"]).all()
    with pytest.raises(ValueError, match="one entry per query"):
        scorer.score(images, regions, crops, texts[:2])


@pytest.mark.gpu
def test_scores_follow_the_module_to_cuda(scorer):
    images, regions, crops, texts = [_image(48, 40, 7)], [(0, 0, 30, 30)], [(0, 0, 40, 40)], [["a cat", "a dog"]]
    cpu = scorer.score(images, regions, crops, texts)[0]
    scorer.to("cuda")
    try:
        gpu = scorer.score(images, regions, crops, texts)[0]
    finally:
        scorer.to("cpu")
    assert gpu["sem"].device.type == "cuda"
    torch.testing.assert_close(gpu["sem"].cpu(), cpu["sem"], atol=1e-4, rtol=1e-4)


def test_loads_from_a_plain_folder(scorer):
    from spr_lightning.tiny import resolve_model_path

    from_folder = SemanticScorer(resolve_model_path("tiny:open_clip"), pretrained="ignored-for-folders")
    ours, theirs = from_folder.model.state_dict(), scorer.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
