"""Every caption format on small files written here, and every bad-input error as users see it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from captioner.cli import main
from captioner.corpus import Corpus
from captioner.errors import CaptionerError
from captioner.readers import read_corpus
from captioner.readers.splits import hash_split


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def captions_of(corpus: Corpus) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for caption in corpus.captions:
        grouped.setdefault(corpus.images[caption.image].path, []).append(caption.raw)
    return grouped


def split_of(corpus: Corpus) -> dict[str, str]:
    return {image.path: image.split for image in corpus.images}


# --- Kaggle captions.txt ------------------------------------------------------------------------


def test_kaggle_quoted_commas_crlf_bom_and_blank_lines(tmp_path: Path) -> None:
    text = (
        "\ufeffimage,caption\r\n"
        'a.jpg,"A dog, a ball and a cat ."\r\n'
        "\r\n"
        "a.jpg,A dog runs .\r\n"
        "b.jpg,Two people walk .\r\n"
        "   \r\n"
    )
    corpus = read_corpus([write(tmp_path / "captions.txt", text)])
    assert corpus.format == "kaggle"
    assert captions_of(corpus) == {
        "a.jpg": ["A dog, a ball and a cat .", "A dog runs ."],
        "b.jpg": ["Two people walk ."],
    }
    assert corpus.captions[0].tokens == ("a", "dog", "a", "ball", "and", "a", "cat")
    assert corpus.skipped == []


def test_kaggle_unquoted_comma_is_joined_back_into_the_caption(tmp_path: Path) -> None:
    corpus = read_corpus([write(tmp_path / "c.txt", "image,caption\na.jpg,A dog, running .\n")])
    assert captions_of(corpus) == {"a.jpg": ["A dog, running ."]}


def test_kaggle_without_split_files_gets_the_hash_split(tmp_path: Path) -> None:
    rows = "".join(f"img{i}.jpg,a dog number {i}\n" for i in range(300))
    corpus = read_corpus([write(tmp_path / "c.txt", "image,caption\n" + rows)])
    assert corpus.split_rule.startswith("hash of the image id")
    assert all(image.split == hash_split(image.id) for image in corpus.images)
    counts = {s: sum(1 for i in corpus.images if i.split == s) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 300
    assert 200 <= counts["train"] <= 280 and counts["val"] > 10 and counts["test"] > 10
    # the same id gets the same split in any corpus, on any machine
    assert hash_split("img0.jpg") == hash_split("img0.jpg")
    assert read_corpus([tmp_path / "c.txt"]).images == corpus.images


def test_hash_split_proportions_on_many_ids() -> None:
    splits = [hash_split(f"{i}.jpg") for i in range(20000)]
    assert abs(splits.count("train") / 20000 - 0.8) < 0.02
    assert abs(splits.count("val") / 20000 - 0.1) < 0.01
    assert abs(splits.count("test") / 20000 - 0.1) < 0.01


def test_lines_without_image_name_or_words_are_skipped_and_counted(tmp_path: Path) -> None:
    text = "image,caption\na.jpg,a dog\nnot-an-image,a cat\nb.jpg, ... \nc.jpg\n"
    corpus = read_corpus([write(tmp_path / "c.txt", text)])
    assert [i.path for i in corpus.images] == ["a.jpg"]
    assert [(s.line, s.reason) for s in corpus.skipped] == [
        (3, "not an image file name"),
        (4, "caption has no words"),
        (5, "expected 2 fields"),
    ]


# --- Flickr8k token.txt + split files ------------------------------------------------------------


def flickr8k_files(folder: Path, with_splits: bool = True) -> Path:
    token = write(
        folder / "token.txt",
        "a.jpg#0\tA dog runs .\n"
        "a.jpg#1\tA brown dog .\n"
        "a.jpg.1#0\tpeople waiting for the subway\n"
        "b.jpg#0\tA cat sleeps .\n"
        "\n"
        "garbage line without a tab\n"
        "c.jpg#0\tA bird sings .\n"
        "d.jpg#0\tA fish swims .\n",
    )
    if with_splits:
        write(folder / "Flickr_8k.trainImages.txt", "a.jpg\nb.jpg\n")
        write(folder / "Flickr_8k.devImages.txt", "c.jpg\n")
        write(folder / "Flickr_8k.testImages.txt", "x.jpg\n")
    return token


def test_flickr8k_malformed_key_is_skipped_and_no_image_is_invented(tmp_path: Path) -> None:
    corpus = read_corpus([flickr8k_files(tmp_path)])
    assert corpus.format == "flickr8k"
    assert captions_of(corpus)["a.jpg"] == ["A dog runs .", "A brown dog ."]
    assert [i.path for i in corpus.images] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    reasons = [(s.line, s.reason) for s in corpus.skipped if s.source.endswith("token.txt")]
    assert reasons == [(3, "malformed image key"), (6, "not an IMAGE#N<TAB>caption line")]


def test_flickr8k_split_files_next_to_it_decide_and_unlisted_images_are_unassigned(
    tmp_path: Path,
) -> None:
    corpus = read_corpus([flickr8k_files(tmp_path)])
    assert split_of(corpus) == {
        "a.jpg": "train",
        "b.jpg": "train",
        "c.jpg": "val",
        "d.jpg": "unassigned",
    }
    assert "Flickr_8k.trainImages.txt" in corpus.split_rule
    # x.jpg is in the test split file but has no caption: reported, not invented
    assert any(s.item == "x.jpg" for s in corpus.skipped)


def test_flickr8k_splits_from_another_folder(tmp_path: Path) -> None:
    (tmp_path / "captions").mkdir()
    token = flickr8k_files(tmp_path / "captions", with_splits=False)
    splits = tmp_path / "splits"
    splits.mkdir()
    write(splits / "Flickr_8k.trainImages.txt", "d.jpg\n")
    write(splits / "Flickr_8k.testImages.txt", "a.jpg\nb.jpg\nc.jpg\n")
    corpus = read_corpus([token], splits_dir=splits)
    assert split_of(corpus) == {"a.jpg": "test", "b.jpg": "test", "c.jpg": "test", "d.jpg": "train"}
    with pytest.raises(CaptionerError, match="no split files"):
        read_corpus([token], splits_dir=tmp_path / "captions")


def test_flickr8k_without_split_files_gets_the_hash_split(tmp_path: Path) -> None:
    corpus = read_corpus([flickr8k_files(tmp_path, with_splits=False)])
    assert all(image.split == hash_split(image.id) for image in corpus.images)


# --- Karpathy JSON -------------------------------------------------------------------------------


def karpathy_file(path: Path) -> Path:
    images = [
        {
            "filename": "1.jpg",
            "filepath": "train2014",
            "cocoid": 1,
            "split": "train",
            "sentences": [{"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]}],
        },
        {
            "filename": "2.jpg",
            "filepath": "val2014",
            "cocoid": 2,
            "split": "restval",
            "sentences": [{"raw": "A cat, sleeping.", "tokens": []}, {"tokens": ["two", "cats"]}],
        },
        {"filename": "3.jpg", "filepath": "val2014", "cocoid": 3, "split": "test", "sentences": []},
    ]
    return write(path, json.dumps({"images": images, "dataset": "coco"}))


def test_karpathy_paths_ids_splits_and_restval(tmp_path: Path) -> None:
    corpus = read_corpus([karpathy_file(tmp_path / "dataset_coco.json")])
    assert corpus.format == "karpathy"
    assert [(i.id, i.path, i.split) for i in corpus.images] == [
        ("1", "train2014/1.jpg", "train"),
        ("2", "val2014/2.jpg", "train"),
        ("3", "val2014/3.jpg", "test"),
    ]
    assert captions_of(corpus)["val2014/2.jpg"] == ["A cat, sleeping.", "two cats"]
    assert corpus.captions[1].tokens == ("a", "cat", "sleeping")
    kept = read_corpus([tmp_path / "dataset_coco.json"], keep_restval=True)
    assert kept.images[1].split == "restval"


# --- MS-COCO JSON --------------------------------------------------------------------------------


def coco_file(path: Path, split: str, first_id: int) -> Path:
    images = [
        {
            "id": first_id + k,
            "file_name": f"COCO_{split}_{first_id + k:012d}.jpg",
            "coco_url": (
                f"http://images.cocodataset.org/{split}/COCO_{split}_{first_id + k:012d}.jpg"
            ),
        }
        for k in range(2)
    ]
    annotations = [
        {"id": 1, "image_id": first_id, "caption": "A man riding a horse."},
        {"id": 2, "image_id": first_id, "caption": "Someone on a horse"},
        {"id": 3, "image_id": 999, "caption": "An orphan caption"},
    ]
    return write(path, json.dumps({"info": {}, "images": images, "annotations": annotations}))


def test_coco_several_files_into_one_corpus(tmp_path: Path) -> None:
    train = coco_file(tmp_path / "captions_train2014.json", "train2014", 10)
    val = coco_file(tmp_path / "captions_val2014.json", "val2014", 20)
    corpus = read_corpus([train, val])
    assert corpus.format == "coco"
    assert [i.id for i in corpus.images] == ["10", "11", "20", "21"]
    assert corpus.images[0].path == "train2014/COCO_train2014_000000000010.jpg"
    assert corpus.images[2].path == "val2014/COCO_val2014_000000000020.jpg"
    assert len(corpus.captions) == 4
    assert corpus.captions_by_image()[1] == []  # an image without captions is kept and reported
    assert [(s.item, s.reason) for s in corpus.skipped] == [
        ("annotations[2]", "caption of an image id not in images")
    ] * 2
    assert all(image.split == hash_split(image.id) for image in corpus.images)


# --- plain CSV / TSV -----------------------------------------------------------------------------


def test_tsv_with_split_column_and_quotes_in_captions(tmp_path: Path) -> None:
    text = (
        "split\timage\tcaption\n"
        'train\tphotos/a.jpg\tA "big" dog, running\n'
        "dev\tphotos/b.jpg\tA cat\n"
        "\tphotos/c.jpg\tA bird\n"
        "holdout\tphotos/d.jpg\tA fish\n"
        "test\tphotos/a.jpg\tThe same dog\n"
    )
    corpus = read_corpus([write(tmp_path / "mine.tsv", text)])
    assert corpus.format == "csv"
    assert captions_of(corpus) == {
        "photos/a.jpg": ['A "big" dog, running'],
        "photos/b.jpg": ["A cat"],
        "photos/c.jpg": ["A bird"],
    }
    assert split_of(corpus) == {
        "photos/a.jpg": "train",
        "photos/b.jpg": "val",
        "photos/c.jpg": hash_split("photos/c.jpg"),
    }
    assert [(s.line, s.reason) for s in corpus.skipped] == [
        (5, "unknown split name"),
        (6, "image listed with two different splits"),
    ]


def test_csv_with_split_column(tmp_path: Path) -> None:
    text = 'image,caption,split\na.jpg,"A dog, brown",train\nb.jpg,A cat,restval\n'
    corpus = read_corpus([write(tmp_path / "mine.csv", text)])
    assert corpus.format == "csv"
    assert split_of(corpus) == {"a.jpg": "train", "b.jpg": "train"}
    assert corpus.split_rule == "from the caption file"
    assert captions_of(corpus)["a.jpg"] == ["A dog, brown"]


# --- detection and mixing ------------------------------------------------------------------------


def test_format_is_detected_from_content_not_name(tmp_path: Path) -> None:
    kaggle = write(tmp_path / "looks.json", "image,caption\na.jpg,a dog\n")
    token = write(tmp_path / "captions.csv", "a.jpg#0\ta dog\n")
    assert read_corpus([kaggle]).format == "kaggle"
    assert read_corpus([token]).format == "flickr8k"
    assert read_corpus([kaggle], format="csv").format == "csv"


def test_files_of_different_formats_are_refused(tmp_path: Path) -> None:
    kaggle = write(tmp_path / "a.txt", "image,caption\na.jpg,a dog\n")
    token = write(tmp_path / "b.txt", "a.jpg#0\ta dog\n")
    with pytest.raises(CaptionerError, match="b.txt: is flickr8k but .*a.txt is kaggle"):
        read_corpus([kaggle, token])


# --- errors, as the command line shows them ------------------------------------------------------


def run_inspect(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("empty.txt", b"", ["empty.txt: empty file"]),
        ("blank.txt", b"\xef\xbb\xbf\r\n  \n", ["blank.txt: empty file"]),
        ("latin1.txt", b"image,caption\na.jpg,a dog\nb.jpg,caf\xe9\n", ["latin1.txt:3: not UTF-8"]),
        ("what.txt", b"\nhello world\n", ["what.txt:2: cannot tell the caption format"]),
        ("shape.json", b'{"images": [{"file": "a.jpg"}]}', ["shape.json: wrong JSON shape"]),
        ("list.json", b"[1, 2]", ["list.json: wrong JSON shape"]),
        ("broken.json", b'{"images": [\n{"id": 1,}\n]}', ["broken.json:2: invalid JSON"]),
        (
            "karpathy.json",
            json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"tokens": 3}]}]}).encode(),
            ["karpathy.json: wrong JSON shape: images[0].sentences[0].tokens should be a list"],
        ),
        (
            "coco.json",
            json.dumps({"images": [{"id": 1}], "annotations": []}).encode(),
            ["coco.json: wrong JSON shape: images[0].file_name should be a str, it is missing"],
        ),
        ("skipped.txt", b"a.jpg.1#0\tpeople\n", ["skipped.txt: no captions found", "malformed"]),
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(
    tmp_path: Path, name: str, content: bytes, fragments: list[str]
) -> None:
    assert_one_line_error(run_inspect(str(write(tmp_path / name, content))), *fragments)


def test_missing_file_and_wrong_header(tmp_path: Path) -> None:
    assert_one_line_error(run_inspect(str(tmp_path / "nope.txt")), "nope.txt: no such file")
    wrong = write(tmp_path / "c.txt", "\nimg,text\na.jpg,a dog\n")
    assert_one_line_error(
        run_inspect(str(wrong), "--format", "kaggle"),
        "c.txt:2: expected the header 'image,caption'",
    )
    assert_one_line_error(
        run_inspect(str(wrong), "--format", "csv"), "c.txt:2: expected a header naming"
    )
    assert_one_line_error(run_inspect(str(wrong)), "c.txt:2: cannot tell the caption format")


def test_missing_image_folder_is_one_line(tmp_path: Path) -> None:
    captions = write(tmp_path / "c.txt", "image,caption\na.jpg,a dog\n")
    assert_one_line_error(
        run_inspect(str(captions), "--images", str(tmp_path / "nope")), "nope: no such image folder"
    )
