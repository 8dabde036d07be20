"""Bad input at scale: property-based tests over every caption reader and over image decoding.

Whatever bytes a caption file holds, reading it ends in a corpus or a one-line CaptionerError that
names the file; whatever bytes an image file holds, decoding it ends in an RGB picture or an
ImageError (a failed row), never another exception, never a silent zero.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.errors import CaptionerError
from captioner.images import ImageError, load_image
from captioner.readers import FORMATS, read_corpus

# The same examples on every run (CI included), and no example database left in the tree.
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
FILE_NAMES = {  # a name each format's files usually have
    "kaggle": "captions.txt",
    "flickr8k": "Flickr8k.token.txt",
    "karpathy": "dataset_coco.json",
    "coco": "captions_train2014.json",
    "csv": "captions.csv",
}

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
cells = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | cells,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(cells, children, max_size=4),
    max_leaves=20,
)
caption_keys = st.sampled_from(
    [
        "images",
        "annotations",
        "sentences",
        "filename",
        "filepath",
        "split",
        "tokens",
        "raw",
        "caption",
        "image_id",
        "id",
        "file_name",
        "sentids",
        "imgid",
    ]
)


def json_documents():
    """JSON of random shapes that look somewhat like Karpathy's and COCO's files."""
    records = st.dictionaries(caption_keys, json_values, max_size=6)
    return st.dictionaries(caption_keys, st.lists(records, max_size=4) | json_values, max_size=4)


@st.composite
def tables(draw) -> str:
    """CSV/TSV/token files of random rows, with headers the readers look for."""
    header = draw(st.sampled_from(["image,caption", "image,caption,split", "image\tcaption", ""]))
    separator = draw(st.sampled_from([",", "\t", "#0\t", ", "]))
    rows = draw(st.lists(st.lists(cells, min_size=1, max_size=4), max_size=8))
    return "\n".join([header, *(separator.join(row) for row in rows)])


def read_bytes_as(data: bytes, format: str | None, name: str = "captions.txt"):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            return read_corpus([path], format=format)
        except CaptionerError as error:
            message = str(error)
            assert "\n" not in message and message, message
            assert str(path) in message or path.name in message, message  # names the file
            return None


@SETTINGS
@given(data=st.binary(max_size=400), format=st.sampled_from([None, *FORMATS]))
def test_random_bytes_are_a_corpus_or_a_one_line_error(data, format):
    read_bytes_as(data, format, FILE_NAMES.get(format, "captions.txt"))


@SETTINGS
@given(content=text | tables(), format=st.sampled_from([None, "kaggle", "flickr8k", "csv"]))
def test_random_tables_are_a_corpus_or_a_one_line_error(content, format):
    corpus = read_bytes_as(content.encode("utf-8"), format)
    if corpus is not None:
        assert all(0 <= c.image < len(corpus.images) for c in corpus.captions)


@SETTINGS
@given(document=json_documents(), format=st.sampled_from([None, "karpathy", "coco"]))
def test_json_of_random_shapes_is_a_corpus_or_a_one_line_error(document, format):
    corpus = read_bytes_as(json.dumps(document).encode(), format, "dataset.json")
    if corpus is not None:
        assert all(0 <= c.image < len(corpus.images) for c in corpus.captions)


@pytest.mark.parametrize(
    "data",
    [
        b"image,caption\n" + b"a.jpg," + b"word " * 200_000 + b"\n",  # a 1 MB line
        b"image,caption\na.jpg,a dog\x00runs\nb.jpg,\x00\x00\n",  # NUL bytes
        b"image,caption\na.jpg,caf\xc3\xa9 au lait\nb.jpg,caf\xe9 noir\n",  # UTF-8 then Latin-1
        "image,caption\na.jpg,a dog\n".encode("utf-16"),  # another encoding altogether
        b"\xef\xbb\xbfimage,caption\na.jpg,a dog with a BOM\n",
    ],
    ids=["huge-line", "nul-bytes", "mixed-encodings", "utf-16", "bom"],
)
def test_awkward_text_files_are_a_corpus_or_a_one_line_error(data):
    read_bytes_as(data, None)


# ---- images ----------------------------------------------------------------------------------

HEADERS = [
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"II*\x00",
    b"MM\x00*",
]


def decode(data: bytes, suffix: str = ".jpg") -> Image.Image | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"picture{suffix}"
        path.write_bytes(data)
        try:
            picture = load_image(path)
        except ImageError as error:
            assert str(error), "an ImageError says why"
            return None
    assert picture.mode == "RGB" and picture.width > 0 and picture.height > 0
    return picture


@SETTINGS
@given(header=st.sampled_from(HEADERS), body=st.binary(max_size=600))
def test_random_bytes_behind_image_headers_are_a_picture_or_an_image_error(header, body):
    decode(header + body)


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=2000), flip=st.integers(min_value=0, max_value=2000))
def test_damaged_real_pictures_are_a_picture_or_an_image_error(cut, flip):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    data[flip % len(data)] ^= 0xFF
    decode(bytes(data[: max(1, len(data) - cut)]))


def test_a_decompression_bomb_is_an_image_error_not_a_crash(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so a small file stands for a bomb
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match="cannot decode image"):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "bomb.png"
            path.write_bytes(buffer.getvalue())
            load_image(path)


def test_16_bit_png_animated_gif_and_every_exif_orientation_decode(tmp_path):
    deep = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    picture = load_image(tmp_path / "deep.png")
    assert picture.mode == "RGB" and 0 < np.asarray(picture).mean() < 255  # scaled, not clipped

    frames = [Image.new("P", (20, 10), color) for color in (1, 2, 3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "anim.gif").size == (20, 10)  # the first frame

    base = Image.new("RGB", (40, 20), (255, 0, 0))
    base.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        base.save(path, exif=exif, quality=95)
        upright = load_image(path)
        expected = (40, 20) if orientation in (1, 2, 3, 4) else (20, 40)
        assert upright.size == expected, orientation
