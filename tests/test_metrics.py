"""Caption metrics: validation BLEU-4, parity with pycocoevalcap, and the labelled fallback."""

from __future__ import annotations

import threading

import pytest
from flickr8k_fixture import flickr8k_test_captions

from captioner import metrics
from captioner.errors import CaptionerError
from captioner.metrics import COCO, FALLBACK, METRICS, corpus_bleu4, score_captions

IMAGES = 200  # the scorers' Java start-up dominates; a few hundred images keep this test fast


def test_corpus_bleu4_is_one_for_a_perfect_match_and_zero_without_overlap():
    references = [
        [["a", "dog", "runs", "on", "the", "grass"]],
        [["two", "men", "ride", "a", "bike"]],
    ]
    perfect = [refs[0] for refs in references]
    assert corpus_bleu4(references, perfect) == pytest.approx(1.0)
    assert corpus_bleu4(references, [["x", "y", "z", "w"], ["q", "r", "s", "t"]]) == 0.0
    assert corpus_bleu4([], []) == 0.0


def test_corpus_bleu4_is_exactly_zero_when_no_4_gram_matches():
    references = [[["a", "dog", "runs", "on", "the", "grass"]]]
    # Words, pairs and triples match but no 4-gram does: NLTK alone gives about 1e-78 here.
    assert corpus_bleu4(references, [["a", "dog", "runs", "in", "the", "grass"]]) == 0.0
    # Only words match: about 1e-232 from NLTK alone.
    assert corpus_bleu4(references, [["a", "cat", "sits", "in", "the", "park"]]) == 0.0
    # One 4-gram match is enough for a real score.
    assert corpus_bleu4(references, [["a", "dog", "runs", "on", "a", "lawn"]]) > 0.5


def test_corpus_bleu4_rewards_closer_hypotheses():
    references = [
        [["a", "dog", "runs", "on", "the", "green", "grass"], ["a", "dog", "is", "running"]]
    ]
    close = corpus_bleu4(references, [["a", "dog", "runs", "on", "the", "grass"]])
    far = corpus_bleu4(references, [["a", "cat", "sits", "on", "the", "grass"]])
    assert 0.0 <= far < close < 1.0


def flickr8k_human_split() -> tuple[dict[str, list[str]], dict[str, str]]:
    """For test images: caption #0 as the 'system', captions #1-#4 as the references."""
    captions = flickr8k_test_captions(IMAGES)
    predictions = {image: texts[0] for image, texts in captions.items()}
    references = {image: texts[1:] for image, texts in captions.items()}
    return references, predictions


def ptb_tokenized(references, predictions) -> tuple[dict, dict]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    return gts, res


def pycocoevalcap_directly(references, predictions) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = ptb_tokenized(references, predictions)
    bleu, _ = Bleu(4).compute_score(gts, res)
    return {
        "BLEU-1": bleu[0],
        "BLEU-2": bleu[1],
        "BLEU-3": bleu[2],
        "BLEU-4": bleu[3],
        "METEOR": Meteor().compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr-D": Cider().compute_score(gts, res)[0],
    }


@pytest.fixture
def one_meteor_process(monkeypatch):
    """METEOR 1.5 takes many seconds to start: both sides of a comparison share the process
    that captioner keeps."""
    from pycocoevalcap.meteor import meteor

    shared = metrics.start_meteor()
    monkeypatch.setattr(meteor, "Meteor", lambda: shared)


@pytest.mark.skipif(not metrics.java_available(), reason="the coco-caption metrics need Java")
def test_scores_equal_pycocoevalcap_on_flickr8k_human_captions(one_meteor_process):
    references, predictions = flickr8k_human_split()
    report = score_captions(references, predictions, implementation="auto")
    assert report.implementation == COCO and not report.fallback
    assert report.images == IMAGES
    expected = pycocoevalcap_directly(references, predictions)
    assert report.scores == expected
    # Human captions against the other humans: well away from zero and from perfect.
    assert 0.1 < report.scores["BLEU-4"] < 0.5 and 0.3 < report.scores["CIDEr-D"] < 1.5
    table = report.format_table()
    assert "CIDEr-D" in table and "FALLBACK" not in table
    assert report.to_dict()["metrics"]["METEOR"] == expected["METEOR"]
    assert_per_image_scores_are_the_corpus_scorers(report, *ptb_tokenized(references, predictions))


class _CountedMeteor:
    """pycocoevalcap's Meteor in shape (a lock, compute_score), counting its starts; it fails
    like a Java process that died once `dead` is set."""

    started = 0

    def __init__(self) -> None:
        type(self).started += 1
        self.lock = threading.Lock()
        self.dead = False

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        if self.dead:
            raise OSError("[Errno 32] Broken pipe")
        return 0.25, [0.25] * len(gts)


@pytest.mark.skipif(not metrics.java_available(), reason="the coco-caption metrics need Java")
def test_one_meteor_process_serves_every_scoring_and_one_that_failed_is_replaced(monkeypatch):
    from pycocoevalcap.meteor import meteor

    monkeypatch.setattr(meteor, "Meteor", _CountedMeteor)
    monkeypatch.setattr(_CountedMeteor, "started", 0)
    metrics.start_meteor.cache_clear()
    try:
        references = {"a": ["a dog runs", "a brown dog"], "b": ["two men ride bikes"]}
        predictions = {"a": "a dog runs", "b": "two men"}
        for _ in range(2):
            assert score_captions(references, predictions).scores["METEOR"] == 0.25
        assert _CountedMeteor.started == 1
        metrics.start_meteor().dead = True
        with pytest.raises(CaptionerError, match=r"^METEOR 1.5 \(java\) failed: .*Broken pipe"):
            score_captions(references, predictions)
        assert score_captions(references, predictions).scores["METEOR"] == 0.25
        assert _CountedMeteor.started == 2
    finally:
        metrics.start_meteor.cache_clear()


def assert_per_image_scores_are_the_corpus_scorers(report, gts: dict, res: dict) -> None:
    """Each image's CIDEr-D is its term of the corpus mean (keyed to the right image, whatever
    the order), its BLEU-4 the coco-caption BLEU-4 of that image scored alone."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    assert set(report.per_image) == set(gts)
    cider = [report.per_image[image]["CIDEr-D"] for image in gts]
    assert sum(cider) / len(cider) == pytest.approx(report.scores["CIDEr-D"])
    backwards = list(reversed(gts))
    _, reordered = Cider().compute_score(
        {i: gts[i] for i in backwards}, {i: res[i] for i in backwards}
    )
    assert [report.per_image[i]["CIDEr-D"] for i in backwards] == pytest.approx(list(reordered))
    for image in list(gts)[:20]:
        alone, _ = Bleu(4).compute_score({image: gts[image]}, {image: res[image]}, verbose=0)
        assert report.per_image[image]["BLEU-4"] == pytest.approx(alone[3])
    assert len(set(cider)) > 10  # they differ from image to image


def test_fallback_per_image_scores_are_said_to_be_nltks_and_rank_images():
    references = {
        "exact": ["a dog runs on the grass", "a brown dog is running"],
        "close": ["two men ride red bikes down a hill", "two men are riding bicycles"],
        "wrong": ["a cat sleeps on a sofa", "a grey cat is asleep"],
    }
    predictions = {
        "exact": "a dog runs on the grass",
        "close": "two men ride bikes",
        "wrong": "x y",
    }
    report = score_captions(references, predictions, implementation=FALLBACK)
    scores = report.per_image
    assert scores["exact"]["BLEU-4"] == pytest.approx(1.0) and scores["wrong"]["BLEU-4"] == 0.0
    assert scores["exact"]["CIDEr-D"] > scores["close"]["CIDEr-D"] > scores["wrong"]["CIDEr-D"] == 0
    cider = [image["CIDEr-D"] for image in scores.values()]
    assert sum(cider) / 3 == pytest.approx(report.scores["CIDEr-D"])
    assert "NLTK" in report.per_image_sources["BLEU-4"]
    assert "FALLBACK" in report.per_image_sources["BLEU-4"]
    assert "per_image" not in report.to_dict()  # metrics.json stays small


def test_without_java_auto_falls_back_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    monkeypatch.setattr(metrics, "DEBIAN_WORDNET", tmp_path / "no-wordnet")
    references = {"a": ["A dog runs on the grass.", "A brown dog is running."], "b": ["Two men."]}
    predictions = {"a": "A dog is running on grass", "b": ""}
    report = score_captions(references, predictions)
    assert report.fallback and report.implementation == FALLBACK
    assert "Java not found" in report.notes[0]
    assert report.to_dict()["fallback"] is True
    assert "FALLBACK" in report.format_table()
    refs = [
        [["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "is", "running"]],
        [["two", "men"]],
    ]
    hyps = [["a", "dog", "is", "running", "on", "grass"], []]
    assert report.scores["BLEU-4"] == corpus_bleu4(refs, hyps)
    assert 0 < report.scores["ROUGE-L"] < 1 and report.scores["CIDEr-D"] > 0
    assert set(report.scores) == set(METRICS)
    with pytest.raises(CaptionerError, match="java: not found"):
        score_captions(references, predictions, implementation=COCO)


def test_fallback_meteor_is_unavailable_without_wordnet(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "load_wordnet", lambda: (None, "no WordNet"))
    report = score_captions({"a": ["a dog runs"]}, {"a": "a dog runs"}, implementation=FALLBACK)
    assert report.scores["METEOR"] is None
    assert any("METEOR unavailable" in note for note in report.notes)
    assert "n/a" in report.format_table()
    assert report.scores["BLEU-1"] == pytest.approx(1.0)


@pytest.mark.skipif(
    not (metrics.DEBIAN_WORDNET / "data.noun").is_file(), reason="Debian wordnet-base absent"
)
def test_fallback_meteor_uses_debian_wordnet(tmp_path):
    wordnet, source = metrics.load_wordnet(cache_dir=tmp_path / "wordnet")
    if source == "NLTK data":
        pytest.skip("NLTK's own WordNet is installed and takes precedence")
    assert wordnet.synsets("dog")
    from nltk.translate.meteor_score import meteor_score

    assert meteor_score([["a", "dog", "runs"]], ["a", "dog", "runs"], wordnet=wordnet) > 0.9


def test_references_must_be_present_for_every_image():
    with pytest.raises(CaptionerError, match="no reference captions"):
        score_captions({"a": []}, {"a": "a dog"}, implementation=FALLBACK)
