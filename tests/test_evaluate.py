"""`evaluate` (a store split -> captions, metrics, files) and `score` (any system's captions)."""

from __future__ import annotations

import csv
import errno
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import failing_on_call, make_store, write_split_pictures
from flickr8k_fixture import flickr8k_test_captions
from inference_factories import make_checkpoint
from PIL import Image

from captioner import files as files_module
from captioner import metrics, models
from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.cli import main
from captioner.inference import evaluate as evaluate_module
from captioner.inference.evaluate import EvaluateConfig, evaluate
from captioner.inference.score import ScoreConfig, score_predictions
from captioner.models.decode import DecodingConfig, generate
from captioner.store import FeatureStore, corpus_digest, training_corpus
from captioner.text import SPECIAL_TOKENS, Vocabulary

FALLBACK = "nltk-fallback"  # no Java start-up: these tests are about evaluate, not the scorers


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.zarr", images=24)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory, store_path) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", store_path)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_evaluate_writes_captions_metrics_and_coco_results(tmp_path, store_path, checkpoint_path):
    decoding = DecodingConfig(beam_size=2, max_length=8)
    config = EvaluateConfig(
        checkpoint_path,
        store_path,
        tmp_path / "out",
        decoding=decoding,
        batch_size=4,
        metrics=FALLBACK,
    )
    result = evaluate(config)

    store = FeatureStore.open(store_path)
    rows = store.split_indices("test")
    checkpoint, _ = load_checkpoint(checkpoint_path)
    decoder = checkpoint.build_decoder()
    features = torch.from_numpy(store.read_spatial(rows).astype(np.float32))
    expected = generate(decoder, features, decoding)  # all test images in one batch
    ids = store.image_ids()
    written = read_rows(tmp_path / "out" / "captions.csv")
    assert [r["image_id"] for r in written] == [ids[row] for row in rows]
    assert [r["caption"] for r in written] == [
        " ".join(c.words(checkpoint.vocabulary)) for c in expected
    ]
    assert [float(r["log_prob"]) for r in written] == pytest.approx(
        [c.log_prob for c in expected], abs=1e-3
    )
    corpus = store.corpus()
    first_refs = [corpus.captions[c].raw for c in corpus.captions_by_image()[rows[0]]]
    assert written[0]["references"] == " | ".join(first_refs)

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results == [{"image_id": r["image_id"], "caption": r["caption"]} for r in written]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["implementation"] == FALLBACK and saved["fallback"] is True
    assert set(saved["metrics"]) == set(metrics.METRICS)
    assert saved["decoding"]["beam_size"] == 2 and saved["split"] == "test"
    assert saved["metrics"]["BLEU-1"] == result.report.scores["BLEU-1"]
    assert result.images == len(rows) == 6


def test_the_compiled_attention_scores_caption_as_the_pytorch_ops_do(
    tmp_path, store_path, checkpoint_path, monkeypatch, native_scores
):
    """evaluate loads the compiled scores for an attention model on a CPU (here forced for a
    tiny one) and writes the same captions as with --no-native-attention."""
    monkeypatch.setattr(models, "worth_compiling", lambda regions, size: True)
    monkeypatch.setattr(models, "load_native_scores", lambda: (native_scores, "cached"))
    loaded = []
    build = evaluate_module.load_native_attention

    def recording(decoder, regions, device):
        note = build(decoder, regions, device)
        loaded.append(decoder.attention.native)
        return note

    monkeypatch.setattr(evaluate_module, "load_native_attention", recording)
    written = {}
    for native in (True, False):
        config = EvaluateConfig(
            checkpoint_path,
            store_path,
            tmp_path / str(native),
            decoding=DecodingConfig(beam_size=3, max_length=8),
            batch_size=4,
            metrics=FALLBACK,
            native_attention=native,
        )
        evaluate(config)
        written[native] = read_rows(tmp_path / str(native) / "captions.csv")
    assert loaded == [native_scores]  # loaded once: --no-native-attention never asks
    assert [r["caption"] for r in written[True]] == [r["caption"] for r in written[False]]
    assert [float(r["log_prob"]) for r in written[True]] == pytest.approx(
        [float(r["log_prob"]) for r in written[False]], abs=1e-4
    )


def test_show_tell_evaluates_from_pooled_features_and_has_nothing_to_visualize(
    tmp_path, store_path
):
    checkpoint = make_checkpoint(tmp_path / "st.pt", store_path, "show-tell")
    config = EvaluateConfig(
        checkpoint, store_path, tmp_path / "out", split="val", visualize=3, metrics=FALLBACK
    )
    result = evaluate(config)
    assert result.figures == 0
    assert any("no attention" in note for note in result.notes)
    assert len(read_rows(tmp_path / "out" / "captions.csv")) == 6


def test_visualize_draws_on_the_images_when_the_folder_is_reachable(
    tmp_path, store_path, checkpoint_path
):
    images = write_split_pictures(store_path, tmp_path / "images")
    config = EvaluateConfig(
        checkpoint_path, store_path, tmp_path / "out", visualize=2, images=images, metrics=FALLBACK
    )
    result = evaluate(config)
    figures = sorted((tmp_path / "out" / "attention").glob("*.png"))
    assert result.figures == 2 and len(figures) == 2
    assert not result.notes
    assert Image.open(figures[0]).size[0] > 100

    no_images = EvaluateConfig(
        checkpoint_path, store_path, tmp_path / "out2", visualize=1, metrics=FALLBACK
    )
    result = evaluate(no_images)
    assert result.figures == 1 and "grid only" in result.notes[0]


def run_cli(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0]


def test_feature_size_mismatch_is_one_line(tmp_path, store_path):
    checkpoint = make_checkpoint(tmp_path / "c.pt", store_path, feature_size=8)
    code, output = run_cli(
        "evaluate", "--checkpoint", checkpoint, "--features", store_path, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, output, "8-channel", "16-channel")


def test_vocabulary_of_another_dataset_is_one_line(tmp_path, store_path):
    other = make_store(
        tmp_path / "other.zarr",
        images=8,
        seed=3,  # another fingerprint
        weights_checksum="generated-seed-0",
    )
    words = Vocabulary([*SPECIAL_TOKENS, *(f"word{i}" for i in range(30))])
    checkpoint = make_checkpoint(tmp_path / "c.pt", other, vocabulary=words)
    code, output = run_cli(
        "evaluate", "--checkpoint", checkpoint, "--features", store_path, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, output, "vocabulary does not match", "0%")


def test_a_store_of_other_images_from_the_same_weights_is_accepted(tmp_path, store_path):
    other = make_store(tmp_path / "other.zarr", images=20, weights_checksum="generated-seed-0")
    checkpoint = make_checkpoint(tmp_path / "c.pt", other)  # same words and encoder weights
    config = EvaluateConfig(checkpoint, store_path, tmp_path / "o", metrics=FALLBACK)
    assert evaluate(config).images == 6


def test_a_store_extracted_with_other_weights_is_one_line(tmp_path, store_path):
    other = make_store(tmp_path / "other.zarr", images=24, seed=5)  # same words, other weights
    checkpoint = make_checkpoint(tmp_path / "c.pt", other)
    code, output = run_cli(
        "evaluate", "--checkpoint", checkpoint, "--features", store_path, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, output, "features of the encoder weights", "was extracted with")
    assert not (tmp_path / "o").exists()


def test_the_splits_a_checkpoint_was_trained_with_are_the_ones_evaluated(tmp_path, store_path):
    """Trained with --captions (another split), evaluate scores that file's test images; if the
    file is gone or its splits changed since, it refuses in one line."""
    corpus = FeatureStore.open(store_path).corpus()
    test_first = {image.path: "train" for image in corpus.images[4:]}
    test_first.update({image.path: "test" for image in corpus.images[:4]})

    def write_captions(split_of: dict[str, str]) -> Path:
        lines = ["image,caption,split"] + [
            f"{image.path},{corpus.captions[c].raw},{split_of[image.path]}"
            for row, image in enumerate(corpus.images)
            for c in corpus.captions_by_image()[row]
        ]
        path = tmp_path / "captions.csv"
        path.write_text("\n".join(lines) + "\n")
        return path

    captions = write_captions(test_first)
    base, _ = load_checkpoint(make_checkpoint(tmp_path / "base.pt", store_path))
    trained = training_corpus(FeatureStore.open(store_path), captions)
    checkpoint = tmp_path / "c.pt"
    save_checkpoint(
        checkpoint,
        replace(
            base,
            training={**base.training, "options": {"captions": str(captions)}},
            corpus_sha256=corpus_digest(trained),
        ),
    )
    config = EvaluateConfig(checkpoint, store_path, tmp_path / "o", metrics=FALLBACK)
    result = evaluate(config)
    assert result.images == 4  # the file's 4 test images, not the store's 6
    assert {row["image_id"] for row in read_rows(tmp_path / "o" / "captions.csv")} == {
        image.id for image in corpus.images[:4]
    }

    write_captions({**test_first, corpus.images[0].path: "train"})
    args = ["evaluate", "--checkpoint", checkpoint, "--features", store_path]
    code, output = run_cli(*args, "--out", tmp_path / "o2")
    assert_one_line_error(code, output, "differ from those it was trained with")
    captions.unlink()
    code, output = run_cli(*args, "--out", tmp_path / "o3")
    assert_one_line_error(code, output, "captions.csv", "is not there")


def test_store_without_the_split_is_one_line(tmp_path):
    train_only = make_store(tmp_path / "train.zarr", images=8, split_fractions=(1, 0, 0))
    checkpoint = make_checkpoint(tmp_path / "c.pt", train_only)
    code, output = run_cli(
        "evaluate", "--checkpoint", checkpoint, "--features", train_only, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, output, "no 'test' images", "train 8")


def test_missing_java_is_one_line_when_coco_metrics_are_required(
    tmp_path, store_path, checkpoint_path, monkeypatch
):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    args = ["evaluate", "--checkpoint", checkpoint_path, "--features", store_path]
    code, output = run_cli(*args, "--out", tmp_path / "o", "--metrics", "coco-caption")
    assert_one_line_error(code, output, "java: not found")
    code, output = run_cli(*args, "--out", tmp_path / "o2", "--beam-size", "1")
    assert code == 0, output
    assert "FALLBACK" in output and "Java not found" in output
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["fallback"] is True


def test_evaluate_py_entry_point_runs_the_same_command(tmp_path, store_path, checkpoint_path):
    import runpy
    import sys

    out = tmp_path / "o"
    argv = ["evaluate.py", "--checkpoint", str(checkpoint_path), "--features", str(store_path)]
    argv += ["--out", str(out), "--metrics", FALLBACK, "--strategy", "greedy"]
    old_argv = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(Path(__file__).parents[1] / "evaluate.py"), run_name="__main__")
    finally:
        sys.argv = old_argv
    assert exit_info.value.code == 0
    assert (out / "metrics.json").is_file()


# ---- score ----


def flickr8k_references_without_caption_zero(folder: Path, images: int) -> tuple[Path, dict]:
    """A Kaggle-style captions.txt with captions #1-#4 of the first test images (all 'test' by
    the split file beside it), and caption #0 of each as a system's prediction."""
    captions = flickr8k_test_captions(images)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.txt", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["image", "caption"])
        for image, texts in captions.items():
            writer.writerows([image, text] for text in texts[1:])
    (folder / "Flickr_8k.testImages.txt").write_text("\n".join(captions) + "\n")
    return folder / "captions.txt", {image: texts[0] for image, texts in captions.items()}


@pytest.mark.skipif(not metrics.java_available(), reason="the coco-caption metrics need Java")
def test_score_one_human_caption_against_the_other_four_equals_pycocoevalcap(tmp_path, monkeypatch):
    from pycocoevalcap.meteor import meteor

    shared = metrics.start_meteor()  # METEOR 1.5 starts slowly: one process for both sides
    monkeypatch.setattr(meteor, "Meteor", lambda: shared)
    from test_metrics import pycocoevalcap_directly

    captions_file, human = flickr8k_references_without_caption_zero(tmp_path / "data", 100)
    predictions = tmp_path / "system.csv"
    with open(predictions, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows(human.items())
    code, output = run_cli(
        "score",
        "--predictions",
        predictions,
        "--captions",
        captions_file,
        "--out",
        tmp_path / "scores",
    )
    assert code == 0, output
    assert "CIDEr-D" in output and "FALLBACK" not in output

    references = {}
    for row in read_rows(captions_file):
        references.setdefault(row["image"], []).append(row["caption"])
    expected = pycocoevalcap_directly(references, human)
    saved = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert saved["metrics"] == expected
    assert saved["implementation"] == "coco-caption" and saved["images"] == 100


def test_score_reads_coco_results_json_and_reports_what_it_left_out(tmp_path):
    captions_file, human = flickr8k_references_without_caption_zero(tmp_path / "data", 20)
    entries = [{"image_id": image, "caption": text} for image, text in list(human.items())[:15]]
    entries.append({"image_id": "not-in-the-dataset.jpg", "caption": "a dog"})
    predictions = tmp_path / "results.json"
    predictions.write_text(json.dumps(entries))
    result = score_predictions(
        ScoreConfig(predictions, [captions_file], tmp_path / "scores", metrics=FALLBACK)
    )
    assert result.report.images == 15
    assert any("scored 15 of 20" in note for note in result.notes)
    assert any("1 predictions for images not in the dataset" in note for note in result.notes)
    saved = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert saved["fallback"] is True and saved["images"] == 15


def test_score_matches_paths_by_file_name_and_refuses_duplicates(tmp_path):
    captions_file, human = flickr8k_references_without_caption_zero(tmp_path / "data", 5)
    predictions = tmp_path / "captions.csv"  # what `captioner caption` writes
    rows = [[f"/photos/{image}", text, "-3.0", ""] for image, text in human.items()]
    with open(predictions, "w", newline="", encoding="utf-8") as file:
        csv.writer(file, lineterminator="\n").writerows([["path", "caption", "log_prob", "error"]])
        csv.writer(file, lineterminator="\n").writerows(rows)
    config = ScoreConfig(predictions, [captions_file], tmp_path / "s", metrics=FALLBACK)
    assert score_predictions(config).report.images == 5
    with open(predictions, "a", newline="", encoding="utf-8") as file:
        csv.writer(file, lineterminator="\n").writerow(rows[0])
    code, output = run_cli(
        "score", "--predictions", predictions, "--captions", captions_file, "--out", tmp_path / "s"
    )
    assert_one_line_error(code, output, "line 7", "second caption")


def test_score_refuses_a_predictions_file_without_the_columns(tmp_path):
    captions_file, _ = flickr8k_references_without_caption_zero(tmp_path / "data", 3)
    predictions = tmp_path / "p.csv"
    predictions.write_text("name,text\na.jpg,a dog\n")
    code, output = run_cli(
        "score", "--predictions", predictions, "--captions", captions_file, "--out", tmp_path / "s"
    )
    assert_one_line_error(code, output, "'caption'")


def test_a_denied_write_of_the_results_is_one_line_and_the_rerun_writes_them(
    tmp_path, store_path, checkpoint_path, monkeypatch
):
    atomic_file = evaluate_module.atomic_file
    failing = failing_on_call(2, errno.EACCES, atomic_file)  # the second file evaluate writes
    monkeypatch.setattr(evaluate_module, "atomic_file", failing)
    monkeypatch.setattr(files_module, "atomic_file", failing)  # write_json's
    args = [
        "evaluate",
        "--checkpoint",
        checkpoint_path,
        "--features",
        store_path,
        "--out",
        tmp_path / "o",
        "--metrics",
        FALLBACK,
        "--beam-size",
        "1",
    ]
    code, output = run_cli(*args)
    last = output.strip().splitlines()[-1]  # (after the decoding progress bar, on stderr)
    assert code == 1 and last.startswith("Error: ") and "Traceback" not in output
    assert "Permission denied" in last and "run the same command again" in last
    monkeypatch.setattr(evaluate_module, "atomic_file", atomic_file)
    monkeypatch.setattr(files_module, "atomic_file", atomic_file)
    code, output = run_cli(*args)
    assert code == 0, output
    written = {path.name for path in (tmp_path / "o").iterdir()}
    assert {"metrics.json", "captions.csv", "results.json"} <= written
