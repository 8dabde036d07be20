"""Caption metrics: a fast corpus BLEU-4 for validation, the coco-caption scores for reports.

Reported numbers come from pycocoevalcap, the Python 3 package of the coco-caption code the papers
use: its PTB tokenizer and METEOR 1.5 run on Java, BLEU, ROUGE-L and CIDEr-D are Python. Its
`Cider` class (whose `method()` says "CIDEr") computes CIDEr-D: clipped n-gram counts, a Gaussian
length penalty (sigma 6), times 10, with document frequencies taken from the scored references.
It is labelled CIDEr-D here.

Without Java the scores are a labelled fallback: our own tokenizer instead of PTB, NLTK BLEU,
NLTK METEOR with WordNet (not METEOR 1.5), and pycocoevalcap's ROUGE-L and CIDEr-D on those tokens.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from nltk.translate.bleu_score import corpus_bleu

from captioner.errors import CaptionerError
from captioner.progress import ShowProgress
from captioner.progress import bar as progress_bar
from captioner.text import tokenize

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
COCO = "coco-caption"
FALLBACK = "nltk-fallback"
IMPLEMENTATIONS = ("auto", COCO, FALLBACK)
# The steps of scoring, as its progress display counts them
SCORING_STEPS = ("tokens", "BLEU", "METEOR", "ROUGE-L", "CIDEr-D")

DEBIAN_WORDNET = Path("/usr/share/wordnet")
# The 45 lexicographer files of WordNet 3.0 (`man 5 lexnames`), in id order: NLTK's reader needs
# the `lexnames` file that Debian's wordnet-base does not ship. Syntactic category: 1 noun, 2 verb,
# 3 adjective, 4 adverb.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def corpus_bleu4(references: list[list[list[str]]], hypotheses: list[list[str]]) -> float:
    """NLTK corpus BLEU-4 in [0, 1] (no smoothing): for each hypothesis, its tokenized references.

    Quick enough to run on greedy decodes every epoch; it is not the coco-caption number.
    """
    return _nltk_bleu(references, hypotheses, 4)


@dataclass
class MetricsReport:
    """Scores (None where a metric could not be computed), how they were computed, and why."""

    scores: dict[str, float | None]
    implementation: str  # COCO or FALLBACK
    images: int
    sources: dict[str, str]  # metric -> what computed it
    notes: list[str] = field(default_factory=list)
    # image -> {"CIDEr-D": ..., "BLEU-4": ...} from the same scorer runs as the corpus figures
    # (kept out of metrics.json, which stays small; report.html shows them), and what gave them.
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    per_image_sources: dict[str, str] = field(default_factory=dict)

    @property
    def fallback(self) -> bool:
        return self.implementation == FALLBACK

    def to_dict(self) -> dict:
        return {
            "metrics": dict(self.scores),
            "implementation": self.implementation,
            "fallback": self.fallback,
            "images": self.images,
            "sources": dict(self.sources),
            "notes": list(self.notes),
        }

    def format_table(self) -> str:
        """A plain-text table; papers quote the scores x 100."""
        title = (
            "coco-caption (pycocoevalcap)" if not self.fallback else "FALLBACK, not coco-caption"
        )
        lines = [f"{'metric':<9} {'score':>8} {'x100':>7}   {title}, {self.images} images"]
        for name in METRICS:
            value = self.scores.get(name)
            if value is None:
                lines.append(f"{name:<9} {'n/a':>8} {'n/a':>7}   {self.sources.get(name, '')}")
            else:
                lines.append(f"{name:<9} {value:>8.4f} {value * 100:>7.2f}   {self.sources[name]}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def java_available() -> bool:
    return shutil.which("java") is not None


def resolved_implementation(implementation: str) -> str:
    """COCO or FALLBACK: what `implementation` ("auto" among them) scores with on this machine."""
    if implementation == "auto":
        return COCO if java_available() else FALLBACK
    return implementation


def score_captions(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    implementation: str = "auto",
    progress: ShowProgress = False,
) -> MetricsReport:
    """Score one predicted caption per image against that image's reference captions (raw text).

    `implementation`: "auto" (coco-caption when Java is found, else the fallback), COCO (Java
    required) or FALLBACK. `progress` counts the metrics' steps (tokens, BLEU, METEOR, ROUGE-L,
    CIDEr-D): pycocoevalcap's scorers run whole, so a step is the finest unit there is.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown metrics implementation {implementation!r}")
    if set(references) != set(predictions):
        raise ValueError("references and predictions must cover the same images")
    if not predictions:
        raise CaptionerError("no captions to score")
    empty = [image for image, refs in references.items() if not refs]
    if empty:
        raise CaptionerError(f"image {empty[0]!r} has no reference captions")
    images = list(predictions)
    notes = []
    if implementation == "auto":
        implementation = resolved_implementation(implementation)
        if implementation == FALLBACK:
            notes.append(
                "Java not found: the coco-caption PTB tokenizer and METEOR 1.5 need it; "
                "these are fallback scores that do not compare with published numbers"
            )
    with progress_bar(progress, "scoring", len(SCORING_STEPS), unit="step") as shown:
        if implementation == COCO:
            return _coco_report(references, predictions, images, shown.update)
        return _fallback_report(references, predictions, images, notes, shown.update)


def _coco_report(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    images: list[str],
    step_done: Callable[[], object],
) -> MetricsReport:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    check_java()
    tokenizer = PTBTokenizer()
    with _stderr_silenced():  # the tokenizer reports its speed on stderr
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in images})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in images})
    step_done()
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    step_done()
    scores["METEOR"] = _meteor_1_5(gts, res)
    step_done()
    scores["ROUGE-L"] = _rouge_l(gts, res)
    step_done()
    cider, cider_per_image = Cider().compute_score(gts, res)
    scores["CIDEr-D"] = float(cider)
    step_done()
    sources = {name: "pycocoevalcap Bleu(4), PTB tokens" for name in METRICS[:4]}
    sources["METEOR"] = "pycocoevalcap METEOR 1.5 (java)"
    sources["ROUGE-L"] = "pycocoevalcap Rouge"
    sources["CIDEr-D"] = "pycocoevalcap Cider (CIDEr-D)"
    per_image_sources = {
        "CIDEr-D": "pycocoevalcap Cider: the image's own term of the corpus mean",
        "BLEU-4": "pycocoevalcap Bleu(4): the image's own BLEU-4",
    }
    return MetricsReport(
        scores,
        COCO,
        len(images),
        sources,
        per_image=_per_image_scores(gts, cider_per_image, bleu_per_image[3]),
        per_image_sources=per_image_sources,
    )


def _fallback_report(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    images: list[str],
    notes: list[str],
    step_done: Callable[[], object],
) -> MetricsReport:
    from pycocoevalcap.cider.cider import Cider

    refs = [[tokenize(c) for c in references[i]] for i in images]
    hyps = [tokenize(predictions[i]) for i in images]
    step_done()
    scores: dict[str, float | None] = {f"BLEU-{n}": _nltk_bleu(refs, hyps, n) for n in range(1, 5)}
    step_done()
    sources = {name: "NLTK corpus_bleu (fallback tokens)" for name in METRICS[:4]}
    wordnet, wordnet_source = load_wordnet()
    if wordnet is None:
        scores["METEOR"] = None
        sources["METEOR"] = "unavailable: no WordNet"
        notes.append(
            "METEOR unavailable: no WordNet in NLTK's data and no Debian wordnet-base "
            f"at {DEBIAN_WORDNET}"
        )
    else:
        from nltk.translate.meteor_score import meteor_score

        per_image = [meteor_score(r, h, wordnet=wordnet) for r, h in zip(refs, hyps, strict=True)]
        scores["METEOR"] = sum(per_image) / len(per_image)
        sources["METEOR"] = f"NLTK meteor_score, WordNet from {wordnet_source} (not METEOR 1.5)"
    step_done()
    gts = {i: [" ".join(t) for t in r] for i, r in zip(images, refs, strict=True)}
    res = {i: [" ".join(h)] for i, h in zip(images, hyps, strict=True)}
    scores["ROUGE-L"] = _rouge_l(gts, res)
    step_done()
    cider, cider_per_image = Cider().compute_score(gts, res)
    scores["CIDEr-D"] = float(cider)
    step_done()
    sources["ROUGE-L"] = "pycocoevalcap Rouge (fallback tokens)"
    sources["CIDEr-D"] = "pycocoevalcap Cider (CIDEr-D, fallback tokens)"
    bleu4_per_image = [_nltk_bleu([r], [h], 4) for r, h in zip(refs, hyps, strict=True)]
    per_image_sources = {
        "CIDEr-D": "pycocoevalcap Cider (fallback tokens): the image's own term of the corpus mean",
        "BLEU-4": "FALLBACK: NLTK BLEU-4 of the image alone (fallback tokens, no smoothing: 0"
        " when no 4-gram matches), not pycocoevalcap's",
    }
    return MetricsReport(
        scores,
        FALLBACK,
        len(images),
        sources,
        notes,
        per_image=_per_image_scores(gts, cider_per_image, bleu4_per_image),
        per_image_sources=per_image_sources,
    )


def _per_image_scores(
    gts: Mapping[str, object], cider: Sequence[float], bleu4: Sequence[float]
) -> dict[str, dict[str, float]]:
    """image -> its CIDEr-D and BLEU-4, from per-image lists in the order of `gts`' keys (the
    order pycocoevalcap's scorers return them in)."""
    return {
        image: {"CIDEr-D": float(c), "BLEU-4": float(b)}
        for image, c, b in zip(gts, cider, bleu4, strict=True)
    }


@functools.cache
def start_meteor():
    """pycocoevalcap's METEOR 1.5 scorer: one Java process, started by the first call and kept
    for the life of this one. Loading its paraphrase tables takes seconds (13 s on a 2-core AMD
    EPYC) where scoring 300 captions takes 0.6 s, so an evaluation starts it before decoding,
    to load meanwhile, and the demo's five evaluations share it."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor_1_5(gts: dict, res: dict) -> float:
    """pycocoevalcap's METEOR, with its lock released when the Java side fails mid-way (else
    the scorer's finalizer waits on that lock forever); a process that failed is not reused."""
    meteor = start_meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (OSError, ValueError) as error:
        start_meteor.cache_clear()
        raise CaptionerError(f"METEOR 1.5 (java) failed: {error}") from None
    finally:
        if meteor.lock.locked():
            meteor.lock.release()


def _nltk_bleu(references: list[list[list[str]]], hypotheses: list[list[str]], n: int) -> float:
    """NLTK corpus BLEU-n without smoothing, exactly 0.0 when some n-gram order has no match.

    NLTK's own no-smoothing puts the smallest float in place of such a zero precision, which
    turns the score into about 1e-232 instead of 0 (and a curve axis into 1e-232). Its smoothing
    hook sees the precisions, so it is used here only to notice a zero one.
    """
    if not hypotheses:
        return 0.0
    unmatched_orders = 0

    def no_smoothing(precisions: list[Fraction], *args: object, **kwargs: object) -> list:
        nonlocal unmatched_orders
        unmatched_orders = sum(precision.numerator == 0 for precision in precisions)
        return precisions

    bleu = corpus_bleu(
        references, hypotheses, weights=(1.0 / n,) * n, smoothing_function=no_smoothing
    )
    return 0.0 if unmatched_orders else float(bleu)


def _rouge_l(gts: dict, res: dict) -> float:
    """pycocoevalcap's ROUGE-L, as it is (an empty caption scores 0 there too)."""
    from pycocoevalcap.rouge.rouge import Rouge

    return float(Rouge().compute_score(gts, res)[0])


def check_java() -> None:
    """A one-line error instead of a Java stack trace or a silent zero score."""
    if not java_available():
        raise CaptionerError(
            "java: not found; the coco-caption metrics (PTB tokenizer, METEOR 1.5) need Java "
            "(install a JRE, or ask for the nltk fallback metrics)"
        )
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        raise CaptionerError(f"java: does not run ({error})") from None


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 (which child processes inherit) to /dev/null for a while."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_wordnet(debian_dir: Path | None = None, cache_dir: Path | None = None):
    """WordNet for NLTK's METEOR, and where it came from; (None, reason) when there is none.

    NLTK's own data first; else Debian's wordnet-base, copied once into a cache directory with the
    `lexnames` file NLTK needs (NLTK only opens corpora under its data paths, so the copy's
    directory is added to them).
    """
    import nltk
    from nltk.corpus import wordnet
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        wordnet.ensure_loaded()
        return wordnet, "NLTK data"
    except LookupError:
        pass
    debian_dir = debian_dir or DEBIAN_WORDNET
    if not (debian_dir / "data.noun").is_file():
        return None, "no WordNet"
    root = _wordnet_copy(debian_dir, cache_dir or _cache_dir() / "wordnet-3.0")
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))

    class DebianWordNet(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:
            """No version map: it needs index.sense (not in wordnet-base) and serves only OMW."""
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return DebianWordNet(str(root), None), str(debian_dir)


def _wordnet_copy(debian_dir: Path, root: Path) -> Path:
    if (root / "lexnames").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".wordnet-"))
    for source in debian_dir.iterdir():
        if source.is_file():
            shutil.copyfile(source, staging / source.name)
    (staging / "lexnames").write_text(
        "".join(
            f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n"
            for i, name in enumerate(_LEXNAMES)
        )
    )
    try:
        staging.rename(root)
    except OSError:  # another process finished its copy first
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"
