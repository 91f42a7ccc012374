"""Box-in-text codecs: hand-checked strings written the way each model writes them, truncated and malformed
output, round trips, stripping, re-inserting boxes, and a fuzz pass (model output never raises)."""

from __future__ import annotations

import random

import pytest

from spr_lightning.coords import CODECS, Grounding, available_codecs, get_codec, smart_resize, tidy_spacing


def boxes(groundings: list[Grounding]) -> list[tuple[float, ...]]:
    return [tuple(round(v, 6) for v in g.xyxy) for g in groundings]


def strip(codec, text: str) -> str:
    """``codec.strip(text)`` (a plain call on a literal trips ruff's str.strip check, B005)."""
    return codec.strip(text)


def phrases(groundings: list[Grounding]) -> list[str | None]:
    return [g.phrase for g in groundings]


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names_and_options():
    assert available_codecs() == sorted(
        ["ferret", "cogvlm", "shikra", "llava", "qwen_vl", "qwen2_5_vl", "minigpt_v2"]
        + ["locvlm_nfp", "locvlm_ivb", "locvlm_diga"]
    )
    assert get_codec("locvlm_ivb", num_bins=336).num_bins == 336
    assert get_codec("shikra", square_pad=False).square_pad is False
    with pytest.raises(KeyError, match="available"):
        get_codec("kosmos")


# ------------------------------------------------------------------------------------------------- ferret
def test_ferret_grounded_description():
    c = get_codec("ferret")
    text = "There is a man [125, 200, 500, 900] riding a horse [400, 300, 999, 999]."
    found = c.decode(text, (800, 600))
    assert boxes(found) == [(100.0, 120.0, 400.0, 540.0), (320.0, 180.0, 799.2, 599.4)]
    assert phrases(found) == ["a man", "riding a horse"]
    assert text[slice(*found[0].span)] == "[125, 200, 500, 900]"
    assert c.strip(text) == "There is a man riding a horse."
    assert c.encode((100, 120, 400, 540), (800, 600)) == "[125, 200, 500, 900]"
    # int(v / size * 1000) clamped to 999: a box touching the right/bottom edge
    assert c.encode((0, 0, 800, 600), (800, 600)) == "[0, 0, 999, 999]"


def test_ferret_forgiving():
    c = get_codec("ferret")
    size = (800, 600)
    assert boxes(c.decode("a cat [ 125 ,200,  500 , 900 ]", size)) == [(100.0, 120.0, 400.0, 540.0)]
    assert boxes(c.decode("a cat [500, 900, 125, 200]", size)) == [(100.0, 120.0, 400.0, 540.0)]  # swapped
    assert boxes(c.decode("a cat [-50, 200, 1200, 900]", size)) == [(0.0, 120.0, 800.0, 540.0)]  # clamped
    assert boxes(c.decode("a cat [125, 200, 500, 900", size)) == [(100.0, 120.0, 400.0, 540.0)]  # truncated
    assert c.decode("a cat [125, 200, 50", size) == []
    assert strip(c, "a cat [125, 200, 50") == "a cat"
    assert c.decode("a cat [125, 200, 500] sits", size) == []
    assert c.decode("Nothing to see here.", size) == []


def test_adjacent_boxes_share_phrase_and_strip_together():
    c = get_codec("ferret")
    text = "two cups [100, 100, 200, 200], [300, 300, 400, 400] and [500, 500, 600, 600] on a table."
    found = c.decode(text, (1000, 1000))
    assert phrases(found) == ["two cups"] * 3
    assert c.strip(text) == "two cups on a table."


# ------------------------------------------------------------------------------------------------- cogvlm
def test_cogvlm_grounded_caption():
    c = get_codec("cogvlm")
    text = "A man[[086,540,400,760]] is holding an umbrella[[300,100,700,520;310,110,690,500]]."
    found = c.decode(text, (1000, 500))
    assert boxes(found) == [(86.0, 270.0, 400.0, 380.0), (300.0, 50.0, 700.0, 260.0), (310.0, 55.0, 690.0, 250.0)]
    assert phrases(found) == ["A man", "holding an umbrella", "holding an umbrella"]
    assert found[1].span == found[2].span  # one group
    assert text[slice(*found[1].span)] == "[[300,100,700,520;310,110,690,500]]"
    assert c.strip(text) == "A man is holding an umbrella."
    assert c.encode((86, 270, 400, 380), (1000, 500)) == "[[086,540,400,760]]"
    assert c.encode([(86, 270, 400, 380), (0, 0, 5, 5)], (1000, 500)) == "[[086,540,400,760;000,000,005,010]]"


def test_cogvlm_variants_and_truncation():
    c = get_codec("cogvlm")
    size = (1000, 500)
    two = [(86.0, 270.0, 400.0, 380.0), (300.0, 50.0, 700.0, 260.0)]
    assert boxes(c.decode("dogs[[086,540,400,760];[300,100,700,520]]", size)) == two
    assert boxes(c.decode("dogs[[086,540,400,760],[300,100,700,520]]", size)) == two
    assert boxes(c.decode("dogs[[ 086, 540, 400, 760 ]]", size)) == two[:1]
    assert boxes(c.decode("dogs[[086,540,400,760", size)) == two[:1]
    assert boxes(c.decode("dogs[[086,540,400,760;300,10", size)) == two[:1]
    assert strip(c, "dogs[[086,540,400,760;300,10") == "dogs"
    assert strip(c, "A dog[[086,5") == "A dog"


# ------------------------------------------------------------------------------------------- shikra/llava
def test_shikra_square_padded_floats():
    c = get_codec("shikra")  # pads (400, 200) to a 400 square, image 100 px down
    text = "A man[0.100,0.300,0.500,0.700] is riding a horse[0.600,0.250,0.900,0.750;0.000,0.250,0.100,0.500]."
    found = c.decode(text, (400, 200))
    assert boxes(found) == [(40.0, 20.0, 200.0, 180.0), (240.0, 0.0, 360.0, 200.0), (0.0, 0.0, 40.0, 100.0)]
    assert phrases(found) == ["A man", "riding a horse", "riding a horse"]
    assert c.encode((40, 20, 200, 180), (400, 200)) == "[0.100,0.300,0.500,0.700]"
    assert c.strip(text) == "A man is riding a horse."
    flat = get_codec("shikra", square_pad=False)
    assert boxes(flat.decode("[0.100,0.300,0.500,0.700]", (400, 200))) == [(40.0, 60.0, 200.0, 140.0)]
    # truncated after the group separator: the complete box survives
    assert boxes(c.decode("A man[0.100,0.300,0.500,0.700;0.6", (400, 200))) == [(40.0, 20.0, 200.0, 180.0)]


def test_llava_two_decimals():
    c = get_codec("llava")
    assert c.encode((40, 20, 200, 180), (400, 200)) == "[0.10, 0.30, 0.50, 0.70]"
    assert boxes(c.decode("[0.10, 0.30, 0.50, 0.70]", (400, 200))) == [(40.0, 20.0, 200.0, 180.0)]
    # H > W: the image sits 50 px right of the square's left edge
    assert boxes(c.decode("[0.25, 0.00, 0.75, 1.00]", (100, 200))) == [(0.0, 0.0, 100.0, 200.0)]
    assert boxes(c.decode("the cup [0.1,0.3,0.5,0.7", (400, 200))) == [(40.0, 20.0, 200.0, 180.0)]
    assert get_codec("llava", square_pad=False).encode((40, 20, 200, 180), (400, 200)) == "[0.10, 0.10, 0.50, 0.90]"


# ------------------------------------------------------------------------------------------------ qwen-vl
def test_qwen_vl_refs_and_999_decoding():
    c = get_codec("qwen_vl")
    size = (999, 1998)
    text = (
        "<ref>A woman</ref><box>(10,20),(500,990)</box> walks with <ref>two dogs</ref>"
        "<box>(510,600),(700,990)</box><box>(720,610),(900,995)</box>."
    )
    found = c.decode(text, size)
    assert boxes(found) == [(10.0, 40.0, 500.0, 1980.0), (510.0, 1200.0, 700.0, 1980.0), (720.0, 1220.0, 900.0, 1990.0)]
    assert phrases(found) == ["A woman", "two dogs", "two dogs"]
    assert text[slice(*found[0].span)] == "<box>(10,20),(500,990)</box>"
    assert c.strip(text) == "A woman walks with two dogs."
    assert c.encode((100, 400, 300, 800), size, phrase="the dog") == "<ref>the dog</ref><box>(100,200),(300,400)</box>"
    # REC answers without <ref>, spaces, truncation
    assert boxes(c.decode("<box>( 100 , 200 ),( 300 , 400 )</box>", size)) == [(100.0, 400.0, 300.0, 800.0)]
    assert boxes(c.decode("<ref>cat</ref><box>(100,200),(300,400)", size)) == [(100.0, 400.0, 300.0, 800.0)]
    assert c.decode("<ref>cat</ref><box>(100,200),(30", size) == []
    assert strip(c, "<ref>cat</ref><box>(100,200),(30") == "cat"
    # a <ref> separated from the box by other words does not ground it
    # (the word rule then applies, reading through the tags)
    assert phrases(c.decode("<ref>cat</ref> sits near <box>(1,2),(3,4)</box>", size)) == ["cat sits near"]


# ---------------------------------------------------------------------------------------------- qwen2.5-vl
QWEN25_ANSWER = """```json
[
\t{"bbox_2d": [644, 364, 1288, 728], "label": "red car"},
\t{"bbox_2d": [0, 0, 322, 182], "label": "tree"}
]
```"""


def test_qwen2_5_vl_json_in_resized_pixels():
    c = get_codec("qwen2_5_vl", resized_size="smart")
    size = (1280, 720)  # smart_resize -> (H', W') = (728, 1288)
    assert c.model_size(size) == (1288, 728)
    found = c.decode(QWEN25_ANSWER, size)
    assert boxes(found) == [(640.0, 360.0, 1280.0, 720.0), (0.0, 0.0, 320.0, 180.0)]
    assert phrases(found) == ["red car", "tree"]
    assert c.strip(QWEN25_ANSWER) == "red car, tree"
    expected = '{"bbox_2d": [644, 364, 1288, 728], "label": "red car"}'
    assert c.encode((640, 360, 1280, 720), size, phrase="red car") == expected
    assert c.encode([(640, 360, 1280, 720)], size) == '[{"bbox_2d": [644, 364, 1288, 728]}]'
    # the other ways to give the resized size agree
    for resized in [(1288, 728), lambda wh: (1288, 728)]:
        assert boxes(get_codec("qwen2_5_vl", resized_size=resized).decode(QWEN25_ANSWER, size)) == boxes(found)
    assert boxes(get_codec("qwen2_5_vl").decode('{"bbox_2d": [1, 2, 3, 4]}', size)) == [(1.0, 2.0, 3.0, 4.0)]
    with pytest.raises(ValueError):
        get_codec("qwen2_5_vl", resized_size="fixed")


def test_qwen2_5_vl_truncated_and_odd_json():
    c = get_codec("qwen2_5_vl")
    size = (1000, 1000)
    text = '[{"bbox_2d": [10, 20, 30, 40], "label": "a \\"big\\" cup"}, {"bbox_2d": [50, 60, 7'
    found = c.decode(text, size)
    assert boxes(found) == [(10.0, 20.0, 30.0, 40.0)]
    assert phrases(found) == ['a "big" cup']
    assert c.strip(text) == 'a "big" cup'
    # label first, single quotes around keys, missing closing brace at the end
    found = c.decode("{'label': \"lamp\", 'bbox_2d': [30, 40, 10, 20]", size)
    assert boxes(found) == [(10.0, 20.0, 30.0, 40.0)] and phrases(found) == ["lamp"]


@pytest.mark.parametrize(
    "height,width,kwargs",
    [
        (720, 1280, {}),
        (480, 640, {}),
        (28, 28, {}),
        (10, 1000, {}),
        (4000, 3000, {}),
        (333, 777, {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}),
        (1080, 1920, {"max_pixels": 12845056}),
        (50, 60, {"factor": 14}),
    ],
)
def test_smart_resize_matches_transformers(height, width, kwargs):
    reference = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl").smart_resize
    assert smart_resize(height, width, **kwargs) == reference(height, width, **kwargs)


def test_smart_resize_rules():
    h, w = smart_resize(1080, 1920)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    with pytest.raises(ValueError):
        smart_resize(1, 500)


# --------------------------------------------------------------------------------------------- minigpt-v2
def test_minigpt_v2_grounded_caption_and_rec():
    c = get_codec("minigpt_v2")
    size = (500, 400)
    text = "<p>a man</p> {<10><20><50><80>} walks <p>a dog</p> {<60><50><90><100>}<delim>{<5><5><15><15>}."
    found = c.decode(text, size)
    assert boxes(found) == [(50.0, 80.0, 250.0, 320.0), (300.0, 200.0, 450.0, 400.0), (25.0, 20.0, 75.0, 60.0)]
    assert phrases(found) == ["a man", "a dog", "a dog"]
    assert c.strip(text) == "a man walks a dog."
    assert c.encode((50, 80, 250, 320), size) == "{<10><20><50><80>}"
    assert c.encode((0, 0, 500, 400), size, phrase="all") == "<p>all</p> {<0><0><100><100>}"
    assert boxes(c.decode("{ <10> <20> <50> <80> }", size)) == [(50.0, 80.0, 250.0, 320.0)]
    assert phrases(c.decode("{<10><20><50><80>}", size)) == [None]
    assert boxes(c.decode("<p>a man</p> {<10><20><50><80>", size)) == [(50.0, 80.0, 250.0, 320.0)]
    assert c.decode("<p>a man</p> {<10><20><50>", size) == []
    assert strip(c, "<p>a man</p> {<10><20><50>") == "a man"


# ------------------------------------------------------------------------------------------------- locvlm
def test_locvlm_nfp():
    c = get_codec("locvlm_nfp")
    assert c.encode((64, 120, 320, 360), (640, 480)) == "[0.1000, 0.2500, 0.5000, 0.7500]"
    found = c.decode("The dog is at (0.1000, 0.2500, 0.5000, 0.7500).", (640, 480))
    assert boxes(found) == [(64.0, 120.0, 320.0, 360.0)] and phrases(found) == ["The dog"]
    assert get_codec("locvlm_nfp", brackets="()").encode((64, 120, 320, 360), (640, 480)).startswith("(0.1000")


def test_locvlm_ivb_bins():
    c = get_codec("locvlm_ivb")  # 224 bins
    found = c.decode("It's at (28, 56, 112, 200).", (448, 224))
    assert boxes(found) == [(56.0, 56.0, 224.0, 200.0)] and phrases(found) == ["It's"]
    assert c.encode((56, 56, 224, 200), (448, 224)) == "[28, 56, 112, 200]"
    assert c.encode((0, 0, 448, 224), (448, 224)) == "[0, 0, 223, 223]"
    big = get_codec("locvlm_ivb", num_bins=336, brackets="()")
    assert big.encode((0, 0, 672, 336), (672, 336)) == "(0, 0, 335, 335)"
    assert strip(c, "It's at (28, 56") == "It's at"


def test_locvlm_diga_anchor_and_deviation():
    c = get_codec("locvlm_diga")  # 8 x 8 grid; 800 px image -> 100 px cells
    # (150, 250): cell col 1 row 2 -> anchor 17, at the centre; (420, 780): col 4 row 7 -> 60, (-0.3, +0.3)
    assert c.encode((150, 250, 420, 780), (800, 800)) == "[17, +0.00, +0.00, 60, -0.30, +0.30]"
    found = c.decode("the kite [17, +0.00, +0.00, 60, -0.30, +0.30]", (800, 800))
    assert boxes(found) == [(150.0, 250.0, 420.0, 780.0)] and phrases(found) == ["the kite"]
    assert boxes(c.decode("(0, -0.5, -0.5, 63, 0.5, 0.5)", (800, 800))) == [(0.0, 0.0, 800.0, 800.0)]
    assert boxes(c.decode("[99, 0, 0, 63, 0, 0]", (800, 800))) == [(750.0, 750.0, 750.0, 750.0)]  # anchor clamped
    assert c.decode("[17, +0.00, +0.00, 60]", (800, 800)) == []
    coarse = get_codec("locvlm_diga", grid=4)
    assert coarse.encode((0, 0, 800, 800), (800, 800)) == "[0, -0.50, -0.50, 15, +0.50, +0.50]"


# ------------------------------------------------------------------------------------- every format alike
BIN_SIZE = {  # one bin in pixels along x for a 640-px-wide image
    "ferret": 640 / 1000,
    "cogvlm": 640 / 1000,
    "qwen_vl": 640 / 999,
    "minigpt_v2": 640 / 100,
    "shikra": 640 / 1000,
    "llava": 640 / 100,
    "locvlm_nfp": 640 / 10000,
    "locvlm_ivb": 640 / 224,
    "locvlm_diga": 640 / 8 / 100,
    "qwen2_5_vl": 1.0,
}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_round_trip_within_one_bin(name):
    c = get_codec(name)
    rng = random.Random(0)
    size = (640, 640)
    for _ in range(50):
        x1, x2 = sorted(rng.uniform(0, 640) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, 640) for _ in range(2))
        text = c.encode((x1, y1, x2, y2), size)
        (g,) = c.decode(text, size)
        assert max(abs(a - b) for a, b in zip(g.xyxy, (x1, y1, x2, y2))) <= BIN_SIZE[name] + 1e-6
        assert c.encode(g.xyxy, size) == text  # encode(decode(x)) == x


@pytest.mark.parametrize("name", sorted(CODECS))
def test_replace_and_rewrite(name):
    c = get_codec(name)
    size = (640, 480)
    a, b, new = (64, 48, 320, 240), (400, 300, 600, 450), (32, 24, 64, 48)
    text = f"Left: {c.encode(a, size, phrase='a cat')} and right: {c.encode(b, size, phrase='a dog')}."
    assert len(c.decode(text, size)) == 2
    swapped = c.replace(text, [new, None], size)
    found = c.decode(swapped, size)
    assert [g.xyxy for g in found] == [g.xyxy for g in c.decode(c.encode(new, size), size)]
    if name == "qwen2_5_vl":  # the label lives inside the removed object and goes with it
        assert c.strip(swapped) == "Left: a cat and right."
    else:  # the words around the boxes are untouched
        assert c.strip(swapped) == c.strip(text)
    assert c.rewrite(text, size, lambda g: g.xyxy) == c.replace(text, [g.xyxy for g in c.decode(text, size)], size)
    with pytest.raises(ValueError, match="2 decodable boxes"):
        c.replace(text, [new], size)


def test_replace_keeps_text_and_drops_separators():
    c = get_codec("ferret")
    size = (1000, 1000)
    text = "two cups [100, 100, 200, 200], [300, 300, 400, 400] here and a cat [1, 2, 3, 4]."
    snap = (10, 10, 20, 20)
    assert c.replace(text, [None, snap, None], size) == "two cups [10, 10, 20, 20] here and a cat."
    assert c.replace(text, [snap, None, None], size) == "two cups [10, 10, 20, 20] here and a cat."
    assert c.replace(text, [None, None, snap], size) == "two cups here and a cat [10, 10, 20, 20]."
    # a group keeps its remaining boxes; a malformed group the decoder skipped is left as written
    cog = get_codec("cogvlm")
    text = "cups[[100,100,200,200;300,300,400,400]] and [[1,2,3]]"
    assert cog.replace(text, [None, snap], size) == "cups[[010,010,020,020]] and [[1,2,3]]"
    # Qwen2.5-VL keeps the label and other keys, only the numbers change
    q = get_codec("qwen2_5_vl")
    obj = '{"bbox_2d": [1, 2, 3, 4], "label": "cup", "score": 0.9}'
    assert q.replace(obj, [snap], size) == '{"bbox_2d": [10, 10, 20, 20], "label": "cup", "score": 0.9}'
    assert q.replace(QWEN25_ANSWER, [None, snap], size).count("bbox_2d") == 1


def test_tidy_spacing():
    assert tidy_spacing("a  man ,  riding ( ) a horse .") == "a man, riding a horse."
    assert tidy_spacing("  x , .\n  y ") == "x.\ny"


FUZZ_ALPHABET = list("[](){}<>;,.:-+ 0123456789\n\"'") + [
    "<ref>", "</ref>", "<box>", "</box>", "<p>", "</p>", "<delim>", "bbox_2d", '"label": "', "a man ", "0.5",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(CODECS))
def test_fuzz_never_raises(name):
    c = get_codec(name)
    rng = random.Random(name)
    size = (640, 480)
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 60)))
        found = c.decode(text, size)
        for g in found:
            x1, y1, x2, y2 = g.xyxy
            assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 480
            assert 0 <= g.span[0] < g.span[1] <= len(text)
        assert isinstance(c.strip(text), str)
        c.replace(text, [g.xyxy for g in found], size)
    # every truncation and single-character corruption of a well-formed answer
    good = f"A {c.encode([(10, 20, 300, 400), (5, 5, 50, 60)], size, phrase='dog')} and {c.encode((1, 2, 3, 4), size)}."
    for cut in range(len(good) + 1):
        text = good[:cut]
        assert len(c.decode(text, size)) <= 3
        assert "  " not in c.strip(text)
        broken = good[:cut] + rng.choice(FUZZ_ALPHABET) + good[cut + 1 :]
        c.replace(broken, [None] * len(c.decode(broken, size)), size)
    assert len(c.decode(good, size)) == 3


def test_overflowing_numbers_are_skipped():
    c = get_codec("ferret")
    text = "[" + "9" * 400 + ", 1, 2, 3] and [1, 2, 3, 4]"
    start = text.index("[1,")
    assert c.decode(text, (1000, 1000)) == [Grounding((1.0, 2.0, 3.0, 4.0), (start, start + 12), None)]
