"""The synthetic shapes dataset: deterministic, captions true to the pixels, a real format."""

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from captioner.cli import main
from captioner.demo import DemoConfig, run_demo
from captioner.errors import CaptionerError
from captioner.readers import read_corpus
from captioner.synthetic import (
    CAPTION_FILE,
    check_caption,
    find_mentions,
    make_scene,
    mirror_relation,
    read_scenes,
    scene_accuracy,
    split_of,
    write_synthetic_dataset,
    write_unlabelled_images,
)
from captioner.synthetic.scene import BACKGROUNDS, COLORS, SHAPES
from captioner.text import tokenize

_KIND = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})")
_SCENES = range(400)  # enough to meet every template, relation and count


def test_the_same_seed_gives_the_same_files_and_image_k_does_not_depend_on_n(tmp_path):
    small = write_synthetic_dataset(tmp_path / "a", images=6, seed=3)
    large = write_synthetic_dataset(tmp_path / "b", images=15, seed=3)
    again = write_synthetic_dataset(tmp_path / "c", images=6, seed=3)
    assert small.read_bytes() == again.read_bytes()
    small_records = json.loads(small.read_text())["images"]
    large_records = json.loads(large.read_text())["images"]
    assert small_records == large_records[:6]
    for record in small_records:
        name = record["filename"]
        assert (tmp_path / "a/images" / name).read_bytes() == (
            tmp_path / "b/images" / name
        ).read_bytes()


def test_the_caption_file_is_streamed_to_the_bytes_a_whole_document_dump_gives(tmp_path):
    caption_file = write_synthetic_dataset(tmp_path, images=3, seed=0, captions_per_image=2)
    text = caption_file.read_text("utf-8")
    assert json.dumps(json.loads(text), indent=1) == text
    # (the file as it was when the whole document was held in memory and dumped at once)
    digest = "0e773943cb73f7d128a80feec1d3b5b69fdb87d870beaf41a2a43caeb49e31b5"
    assert hashlib.sha256(caption_file.read_bytes()).hexdigest() == digest


def test_other_seeds_and_unlabelled_images_are_other_scenes(tmp_path):
    captions = {seed: make_scene(seed, 0)[2] for seed in range(6)}
    assert len({tuple(c) for c in captions.values()}) > 1
    dataset = np.asarray(make_scene(0, 0)[1])
    fresh = write_unlabelled_images(tmp_path / "fresh", images=3, seed=0)
    assert [p.name for p in fresh] == ["scene_00000.jpg", "scene_00001.jpg", "scene_00002.jpg"]
    assert not (tmp_path / "fresh" / CAPTION_FILE).exists()
    assert np.abs(np.asarray(make_scene(0, 0, stream=1)[1]).astype(int) - dataset).mean() > 5


def test_every_reference_caption_checks_out_against_its_scene():
    relations, counts, wordings = Counter(), Counter(), set()
    for index in _SCENES:
        scene, _, captions = make_scene(7, index)
        assert len(captions) == len(set(captions)) == 5
        relations[scene.relation] += 1
        counts[sum(g.count for g in scene.groups)] += 1
        for raw in captions:
            check = check_caption(tokenize(raw), scene)
            assert check.objects, raw
            assert check.layout in (None, True), raw
            wordings.add(_KIND.sub("X", raw.lower()))
    assert set(relations) == {None, "left of", "above"} and min(relations.values()) > 50
    assert set(counts) == {1, 2, 3}
    assert len(wordings) > 15  # the references vary in wording, not only in their objects


def test_only_the_picture_tells_which_relation_word_comes():
    """Which group is named first is drawn per caption, so "left" and "right" (etc.) are equally
    likely after any prefix; a caption's mirror keeps its objects but states the wrong layout."""
    first_named, opening_words = Counter(), Counter()
    for index in _SCENES:
        scene, _, captions = make_scene(3, index)
        if scene.relation is None:
            continue
        for raw in captions:
            tokens = tokenize(raw)
            first = find_mentions(tokens)[0]
            first_named[(first.color, first.shape) == scene.groups[0].kind] += 1
            opening_words[
                next(
                    w
                    for w in tokens
                    if w in ("left", "right", "top", "bottom", "above", "below", "over", "under")
                )
            ] += 1
            mirrored = check_caption(mirror_relation(tokens), scene)
            assert mirrored.objects and mirrored.layout is False, raw
    assert 0.4 < first_named[True] / sum(first_named.values()) < 0.6
    for word, opposite in (("left", "right"), ("above", "below"), ("over", "under")):
        assert 0.35 < opening_words[word] / (opening_words[word] + opening_words[opposite]) < 0.65


def test_left_and_right_in_the_captions_match_the_object_positions():
    """Independent of the caption parser: read "X ... left/right ... Y" with a regex and compare
    with where the objects' pixels are."""
    checked = 0
    for index in _SCENES:
        scene, image, captions = make_scene(11, index)
        pixels = np.asarray(image).astype(float)
        for group in scene.groups:  # the stated object positions are where its color is drawn
            for x, y in group.centers:
                patch = pixels[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2].mean(axis=(0, 1))
                assert np.abs(patch - COLORS[group.color]).max() < 45
                assert np.abs(patch - BACKGROUNDS[scene.background]).max() > 45
        x_of = {(g.color, g.shape): np.mean([c[0] for c in g.centers]) for g in scene.groups}
        for raw in captions:
            text = raw.lower()
            side = re.search(r"\b(left|right)\b", text)  # the first one says where X is
            if side is None:
                continue
            first, second = [tuple(m) for m in _KIND.findall(text)]
            assert (x_of[first] < x_of[second]) == (side.group(1) == "left"), raw
            checked += 1
    assert checked > 200


def test_the_caption_check_catches_wrong_objects_and_a_wrong_layout():
    scene = next(
        s
        for s, _, _ in map(lambda i: make_scene(5, i), _SCENES)
        if s.relation == "left of" and all(g.count == 1 for g in s.groups)
    )
    left, right = (f"a {g.color} {g.shape}" for g in scene.groups)
    wrong_color = next(c for c in COLORS if c != scene.groups[0].color)
    assert check_caption(tokenize(f"{left} to the left of {right}"), scene).layout is True
    assert check_caption(tokenize(f"{right} to the right of {left}"), scene).layout is True
    assert check_caption(tokenize(f"{left} to the right of {right}"), scene).layout is False
    assert check_caption(tokenize(f"{right} above {left}"), scene).layout is False
    assert check_caption(tokenize(f"{left}"), scene).objects is False
    swapped = f"a {wrong_color} {scene.groups[0].shape} left of {right}"
    assert check_caption(tokenize(swapped), scene).objects is False
    accuracy = scene_accuracy(
        [tokenize(f"{left} left of {right}"), tokenize(f"{right} left of {left}")], [scene, scene]
    )
    assert accuracy == {"objects": 1.0, "layout": 0.5, "layout_images": 2}


def test_the_dataset_reads_back_as_a_karpathy_corpus(tmp_path):
    caption_file = write_synthetic_dataset(tmp_path, images=30, seed=1, captions_per_image=4)
    corpus = read_corpus([caption_file])
    assert corpus.format == "karpathy" and not corpus.skipped
    assert len(corpus.images) == 30 and len(corpus.captions) == 120
    assert Counter(i.split for i in corpus.images) == Counter(split_of(i) for i in range(30))
    assert Counter(corpus.images[i].split for i in range(30)) == {"train": 24, "val": 3, "test": 3}
    assert all((tmp_path / image.path).is_file() for image in corpus.images)
    scenes = read_scenes(caption_file)
    for caption in corpus.captions:
        scene = scenes[corpus.images[caption.image].path.split("/")[-1]]
        assert check_caption(caption.tokens, scene).objects


def test_a_finished_dataset_is_reused_and_other_parameters_are_refused(tmp_path):
    caption_file = write_synthetic_dataset(tmp_path, images=4, seed=0)
    before = caption_file.stat().st_mtime_ns
    assert write_synthetic_dataset(tmp_path, images=4, seed=0) == caption_file
    assert caption_file.stat().st_mtime_ns == before
    with pytest.raises(CaptionerError, match="--overwrite"):
        write_synthetic_dataset(tmp_path, images=4, seed=1)
    write_synthetic_dataset(tmp_path, images=5, seed=1, overwrite=True)
    assert len(json.loads(caption_file.read_text())["images"]) == 5


def test_the_synth_command(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "--out", str(tmp_path / "d"), "--images", "20"])
    assert result.exit_code == 0, result.output
    assert "16 train, 2 val, 2 test" in result.output
    assert len(list((tmp_path / "d/images").glob("*.jpg"))) == 20
    result = runner.invoke(main, ["synth", "--out", str(tmp_path / "d"), "--images", "21"])
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        main, ["synth", "--out", str(tmp_path / "u"), "--images", "3", "--unlabelled"]
    )
    assert result.exit_code == 0 and len(list((tmp_path / "u").iterdir())) == 3


def test_the_demo_refuses_a_dataset_made_with_other_settings_and_says_what_to_do(tmp_path):
    config = DemoConfig(root=tmp_path, images=20)
    write_synthetic_dataset(config.dataset, 30, config.seed, config.image_size)
    with pytest.raises(CaptionerError, match="another --name, or delete that demo's files"):
        run_demo(config)
