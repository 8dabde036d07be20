"""`make demo`: the whole product, offline, on the synthetic shapes dataset, in minutes on a CPU.

Six phases, each calling the library the way a user's commands would, each reusing what an
earlier run already finished (a finished dataset, a complete store, a trained run, an evaluation
newer than its checkpoint, captions already in the CSV), so a re-run, or a run after an
interruption, redoes only what is missing:

1. render the dataset (captioner.synthetic) and a folder of fresh, unlabelled scenes;
2. extract features with a small CNN whose weights are a seeded random init (nothing can be
   downloaded here: see RANDOM_WEIGHTS_NOTE);
3. train Show-and-Tell, Show-Attend-and-Tell and the Transformer from the store, then fine-tune
   the best of them (by the validation CIDEr-D of its best.pt) with self-critical sequence
   training on CIDEr-D (`scst_epochs`; 0 skips it);
4. evaluate them on the test split (beam search, coco-caption metrics) and check their captions
   against the true scenes (objects named right; relation right where two groups are shown),
   next to the best a constant caption can do;
5. caption the fresh folder to CSV with the last model trained (the SCST one, if any);
6. list every artifact, and last the page to open: that model's report.html.

Everything goes under `root`: data/NAME, data/NAME_fresh, features/NAME_<encoder>.zarr,
runs/NAME-<model> and results/NAME-<model> (the SCST run's <model> is the one it fine-tunes,
suffixed "+scst"), results/NAME_fresh_captions.csv. A run with settings
that do not match the earlier work under the same NAME is refused by the phase that notices;
choose another `name` for it.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from captioner.devices import default_workers
from captioner.encoder import EncoderConfig
from captioner.errors import CaptionerError
from captioner.extraction.extract import ExtractConfig, ExtractSummary, extract_features
from captioner.inference.caption import CaptionConfig, CaptionSummary, caption_images
from captioner.inference.caption_output import CaptionModel, CaptionOutput
from captioner.inference.evaluate import EvaluateConfig, evaluate
from captioner.inference.report import REPORT_NAME
from captioner.metrics import METRICS, score_captions
from captioner.models.decode import DecodingConfig
from captioner.progress import ShowProgress
from captioner.store import FeatureStore
from captioner.synthetic import (
    read_scenes,
    scene_accuracy,
    write_synthetic_dataset,
    write_unlabelled_images,
)
from captioner.synthetic.layout_probe import layout_preference
from captioner.text import tokenize
from captioner.training import TrainConfig, TrainResult, train

MODELS = ("show-tell", "show-attend-tell", "transformer")
ATTENTION_MODELS = ("show-attend-tell", "transformer")  # what has attention maps to draw
CONSTANT = "constant caption"

# Each decoder's settings on these scenes, over train_decoder.py's defaults.
# The LSTMs: these small decoders take 7.5x train_decoder.py's rate. alpha_c is 0 because the
# paper's doubly stochastic penalty pushes every region towards a full share of attention over a
# caption: right for 196 regions of a photo, but on a 3x3 grid with two objects it drags
# attention onto the empty cells and the model stops seeing which side things are on.
# The transformer: chosen on these scenes (bench/RESULTS.md [demo]): an encoder layer raised
# validation CIDEr-D but lowered the layout probe, 2e-3 did worse than 1e-3, and a warm-up of
# two epochs made no consistent difference.
_LSTM_SETTINGS = dict(
    embed_size=128, hidden_size=256, attention_size=128, dropout=0.3, lr=3e-3, alpha_c=0.0
)
DECODER_SETTINGS: dict[str, dict[str, float]] = {
    "show-tell": _LSTM_SETTINGS,
    "show-attend-tell": _LSTM_SETTINGS,
    "transformer": dict(
        d_model=128, layers=2, heads=4, ff_size=512, encoder_layers=0, dropout=0.1, lr=1e-3,
        warmup_steps=0,
    ),
}  # fmt: skip

RANDOM_WEIGHTS_NOTE = """\
Why these captions come from a random-init CNN: pretrained ImageNet weights cannot be downloaded
here, so the demo extracts features with the small `{name}` CNN and --weights none (a seeded
random init). Random convolutions keep colour, brightness and a trace of where things are, so the
decoders learn to name colours and counts well above chance, and the attention model also which
side things are on; shapes they name less reliably, because nothing here learned what a star
looks like. On a machine with internet, run the
same pipeline on ImageNet features, e.g.:
  captioner extract --captions {captions} --images {images} \\
      --out features/shapes_resnet18.zarr --encoder resnet18 --weights imagenet --image-size 224
  captioner train --features features/shapes_resnet18.zarr --model show-attend-tell \\
      --out runs/shapes-resnet18-show-attend-tell
or simply: captioner demo --name shapes-imagenet --encoder resnet18 --weights imagenet
(--weights also takes a local state-dict file, for machines without internet)."""


@dataclass(frozen=True)
class DemoConfig:
    root: Path = Path(".")
    name: str = "shapes"
    images: int = 6000  # labelled images: 80% train, 10% val, 10% test
    fresh_images: int = 24  # unlabelled images captioned to CSV
    seed: int = 0
    image_size: int = 96  # rendered size; the encoder resizes to its own
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("tiny", "none", 96))
    # Many images seen once an epoch with one of their captions teach where things are better
    # than few images seen with all five: attention learns layout from varied pictures.
    epochs: int = 20
    batch_size: int = 50  # captions per batch
    captions_per_image: int = 1  # drawn per image each epoch; 0 = all
    # Self-critical fine-tuning of the best cross-entropy decoder. The rate is 6x the 5e-5 of
    # practice, as the cross-entropy rate is 7.5x train_decoder.py's for these small decoders;
    # 4e-4 reached the attention model's best validation CIDEr-D in 2 epochs and came apart by
    # the 5th (bench/RESULTS.md).
    scst_epochs: int = 3
    scst_lr: float = 3e-4
    beam_size: int = 3
    figures: int = 8  # attention overlays written for test images
    device: str = "auto"
    workers: int = default_workers(2)

    @property
    def dataset(self) -> Path:
        return self.root / "data" / self.name

    @property
    def fresh(self) -> Path:
        return self.root / "data" / f"{self.name}_fresh"

    @property
    def store(self) -> Path:
        encoder = self.encoder
        return self.root / "features" / f"{self.name}_{encoder.name}_{encoder.image_size}.zarr"

    def run(self, model: str) -> Path:
        return self.root / "runs" / f"{self.name}-{model}"

    def results(self, model: str) -> Path:
        return self.root / "results" / f"{self.name}-{model}"

    @property
    def fresh_captions(self) -> Path:
        return self.root / "results" / f"{self.name}_fresh_captions.csv"


@dataclass
class ModelOutcome:
    metrics: dict[str, float | None]  # coco-caption scores on the test split
    scene: dict  # scene_accuracy of its test captions: objects, layout, layout_images
    # share of two-group test captions it finds likelier than their left/right mirror
    layout_preference: float | None = None  # None: constant caption, or no two-group image
    training: TrainResult | None = None  # None for the constant caption


def scst_name(model: str) -> str:
    """The name of the self-critical fine-tuning of `model` (its run and results folders)."""
    return f"{model}+scst"


@dataclass
class DemoResult:
    config: DemoConfig
    caption_file: Path
    extraction: ExtractSummary
    models: list[str]  # what it trained, in order: MODELS, then the SCST run unless none
    outcomes: dict[str, ModelOutcome]  # `models` and CONSTANT
    metrics_implementation: str
    constant_caption: str
    captioning: CaptionSummary
    samples: list[tuple[str, str]]  # (fresh image, its caption)
    seconds: dict[str, float]  # per phase

    @property
    def report(self) -> Path:
        """The page to look at: the last model's test evaluation, image by image."""
        return self.config.results(self.models[-1]) / REPORT_NAME


def run_demo(
    config: DemoConfig, say: Callable[[str], None] = lambda _: None, progress: ShowProgress = False
) -> DemoResult:
    """Run (or finish) the demo; `say` receives a line at each phase, `progress` shows bars."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase] = time.perf_counter() - clock
        clock = time.perf_counter()

    say(f"[1/5] dataset: {config.images} rendered scenes in {config.dataset}")
    try:
        caption_file = write_synthetic_dataset(
            config.dataset, config.images, config.seed, config.image_size, progress=progress
        )
    except CaptionerError as error:  # a demo made earlier with other settings
        raise CaptionerError(
            f"{error} (for `captioner synth`); for the demo: run it under another --name, or "
            "delete that demo's files "
            f"(data/{config.name}*, features/{config.name}_*, runs/{config.name}-*, "
            f"results/{config.name}*) under {config.root}"
        ) from None
    write_unlabelled_images(config.fresh, config.fresh_images, config.seed, config.image_size)
    lap("dataset")

    say(f"[2/5] features: {config.encoder.name} CNN at {config.encoder.image_size} px")
    if config.encoder.weights == "none":
        say(
            RANDOM_WEIGHTS_NOTE.format(
                name=config.encoder.name, captions=caption_file, images=config.dataset
            )
        )
    extraction = extract_features(
        ExtractConfig(
            captions=[caption_file],
            images=config.dataset,
            out=config.store,
            encoder=config.encoder,
            device=config.device,
            workers=config.workers,
            dtype="float32",
        ),
        progress=progress,
    )
    say(extraction.describe())
    _stop_if(extraction.stopped, "feature extraction")
    lap("features")

    trained = {}
    for model in MODELS:
        say(f"[3/5] training {model} for {config.epochs} epochs: {config.run(model)}")
        trained[model] = train(_train_config(config, model), progress=progress)
        _stop_if(trained[model].preempted, f"training {model}")
        say(
            f"best validation BLEU-4 {trained[model].best_score:.4f} "
            f"at epoch {trained[model].best_epoch}"
        )
    if config.scst_epochs:
        base = best_cross_entropy_model(trained)
        scst = scst_name(base)
        say(
            f"[3/5] self-critical fine-tuning of {base} (the best validation CIDEr-D) on CIDEr-D"
            f" for {config.scst_epochs} epochs: {config.run(scst)}"
        )
        trained[scst] = train(_scst_config(config, base), progress=progress)
        _stop_if(trained[scst].preempted, "self-critical training")
        say(
            f"best validation CIDEr-D {trained[scst].best_score:.4f} "
            f"at epoch {trained[scst].best_epoch}"
        )
    models = list(trained)
    lap("training")

    say("[4/5] evaluation on the test split")
    scenes = read_scenes(caption_file)
    outcomes, implementation = {}, ""
    for model in models:
        metrics = _evaluated(config, model, progress)
        implementation = metrics["implementation"]
        captions = _test_captions(config.results(model) / "captions.csv")
        preference, _ = layout_preference(
            config.run(model) / "best.pt", config.store, scenes, split="test"
        )
        outcomes[model] = ModelOutcome(
            metrics["metrics"], _scene_accuracy(captions, scenes), preference, trained[model]
        )
    constant, constant_metrics = _constant_caption(config)
    outcomes[CONSTANT] = ModelOutcome(
        constant_metrics,
        _scene_accuracy(
            {
                image: constant
                for image in _test_captions(config.results(MODELS[0]) / "captions.csv")
            },
            scenes,
        ),
    )
    lap("evaluation")

    say(f"[5/5] captioning the fresh images in {config.fresh}")
    fresh = CaptionConfig(
        inputs=[config.fresh],
        checkpoint=config.run(models[-1]) / "best.pt",
        out=config.fresh_captions,
        decoding=DecodingConfig(beam_size=config.beam_size),
        device=config.device,
        workers=config.workers,
    )
    _forget_captions_of_another_model(fresh)
    captioning = caption_images(fresh, progress=progress)
    _stop_if(captioning.stopped, "captioning")
    lap("captioning")
    return DemoResult(
        config,
        caption_file,
        extraction,
        models,
        outcomes,
        implementation,
        constant,
        captioning,
        _read_samples(config.fresh_captions, 5),
        seconds,
    )


# The demo's options that are train_decoder.py's of the same name.
_SHARED_WITH_TRAINING = ("batch_size", "captions_per_image", "device", "seed")


def _train_config(config: DemoConfig, model: str) -> TrainConfig:
    out = config.run(model)
    return TrainConfig(
        features=config.store,
        out=out,
        model=model,
        epochs=config.epochs,
        min_count=1,
        preload="ram",
        resume=(out / "last.pt").exists(),
        **{name: getattr(config, name) for name in _SHARED_WITH_TRAINING},
        **DECODER_SETTINGS[model],
    )


def best_cross_entropy_model(trained: dict[str, TrainResult]) -> str:
    """The model whose best.pt has the highest validation CIDEr-D, the metric SCST optimizes
    (best.pt itself is each run's best validation BLEU-4 epoch; the first model wins a tie)."""
    return max(trained, key=lambda model: _best_row(trained[model])["val_cider"])


def _best_row(result: TrainResult) -> dict:
    return next(row for row in result.history if row["epoch"] == result.best_epoch)


def _scst_config(config: DemoConfig, model: str) -> TrainConfig:
    """Self-critical fine-tuning of `model` from its best cross-entropy epoch, at a constant
    rate (the sizes are the checkpoint's; label smoothing and the attention penalty do not
    apply)."""
    out = config.run(scst_name(model))
    return replace(
        _train_config(config, model),
        out=out,
        objective="scst",
        init=config.run(model) / "best.pt",
        epochs=config.scst_epochs,
        lr=config.scst_lr,
        warmup_steps=0,
        resume=(out / "last.pt").exists(),
    )


def _evaluated(config: DemoConfig, model: str, progress: ShowProgress) -> dict:
    """metrics.json of the model's test evaluation, evaluating only if it or its report.html is
    missing, or it is older than the checkpoint."""
    checkpoint = config.run(model) / "best.pt"
    out = config.results(model)
    metrics_file = out / "metrics.json"
    if (
        not metrics_file.exists()
        or not (out / REPORT_NAME).exists()
        or metrics_file.stat().st_mtime < checkpoint.stat().st_mtime
    ):
        figures = config.figures if model.removesuffix("+scst") in ATTENTION_MODELS else 0
        evaluate(
            EvaluateConfig(
                checkpoint=checkpoint,
                features=config.store,
                out=out,
                split="test",
                decoding=DecodingConfig(beam_size=config.beam_size),
                device=config.device,
                visualize=figures,
                images=config.dataset,
            ),
            progress=progress,
        )
    return json.loads(metrics_file.read_text("utf-8"))


def _constant_caption(config: DemoConfig) -> tuple[str, dict]:
    """The train split's most frequent caption, given for every test image, and its scores:
    what a model that ignores the image would reach."""
    out = config.results("constant") / "metrics.json"
    if out.exists():
        saved = json.loads(out.read_text("utf-8"))
        return saved["caption"], saved["metrics"]
    corpus = FeatureStore.open(config.store).corpus()
    counts = Counter(
        " ".join(c.tokens) for c in corpus.captions if corpus.images[c.image].split == "train"
    )
    caption = min(counts, key=lambda text: (-counts[text], text))
    references = {
        corpus.images[row].path: [c.raw for c in captions]
        for row, captions in corpus.references(corpus.image_indices("test")).items()
    }
    report = score_captions(references, {image: caption for image in references})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"caption": caption, "metrics": report.scores}, indent=2), "utf-8")
    return caption, report.scores


def _test_captions(path: Path) -> dict[str, str]:
    """image id -> generated caption, from an evaluation's captions.csv."""
    with open(path, newline="", encoding="utf-8") as file:
        return {row["image_id"]: row["caption"] for row in csv.DictReader(file)}


def _scene_accuracy(captions: dict[str, str], scenes: dict) -> dict:
    names = [Path(image).name for image in captions]
    missing = [name for name in names if name not in scenes]
    if missing:
        raise CaptionerError(f"{missing[0]}: not an image of the synthetic dataset")
    return scene_accuracy(
        [tokenize(text) for text in captions.values()], [scenes[name] for name in names]
    )


def _forget_captions_of_another_model(config: CaptionConfig) -> None:
    """Remove the demo's captions of the fresh images where an earlier model made them (a re-run
    that trained on), so that they are captioned again by the last model: an output holds one
    model's captions, and this one is the demo's own."""
    recorded = CaptionOutput(config.out, config.format).recorded_model()
    last_model = CaptionModel.of(config.checkpoint, config.decoding)
    if recorded is not None and recorded.differences(last_model):
        config.out.unlink(missing_ok=True)


def _stop_if(signal_name: str, phase: str) -> None:
    """End the demo when a phase was stopped by SIGTERM or Ctrl-C: the next phases need it whole,
    and a re-run continues it (every phase resumes)."""
    if signal_name:
        raise CaptionerError(
            f"stopped by {signal_name} during {phase}: run the demo again to continue where it"
            " stopped"
        )


def _read_samples(path: Path, count: int) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    return [(row["path"], row["caption"]) for row in rows[:count]]


def format_comparison(result: DemoResult) -> str:
    """The decoders and the constant caption side by side (scores x 100)."""
    columns = [*result.models, CONSTANT]
    widths = [len(c) + 2 for c in columns]

    def row(label: str, cells: list[float | None]) -> str:
        return f"{label:<20}" + "".join(_cell(v, w) for v, w in zip(cells, widths, strict=True))

    header = "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    lines = [f"{'test split':<20}{header}"]
    for metric in METRICS:
        lines.append(row(metric, [result.outcomes[c].metrics.get(metric) for c in columns]))
    for key, label in (("objects", "objects right"), ("layout", "layout right")):
        lines.append(row(label, [result.outcomes[c].scene[key] for c in columns]))
    lines.append(row("sees layout", [result.outcomes[c].layout_preference for c in columns]))
    scene = result.outcomes[MODELS[0]].scene
    lines.append(
        f"(x100. Metrics: {result.metrics_implementation}. 'objects right': every object named"
        " with its count, colour and shape; 'layout right': the stated relation holds, on the"
        f" {scene['layout_images']} test images with two groups; 'sees layout': how often it"
        " finds a two-group reference likelier than the same words with left/right (above/below)"
        " swapped, 50 = blind to layout. Constant caption:"
        f" {result.constant_caption!r})"
    )
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value * 100:>{width}.1f}"


def format_artifacts(result: DemoResult) -> str:
    """Where everything the demo made lies."""
    config = result.config
    attended = [model for model in result.models if model in ATTENTION_MODELS]
    entries = [
        ("dataset (Karpathy JSON + images/)", result.caption_file),
        ("fresh unlabelled images", config.fresh),
        ("feature store", config.store),
        *[
            entry
            for model in result.models
            for entry in (
                (f"{model} checkpoint", config.run(model) / "best.pt"),
                (f"{model} training curves", config.run(model) / "curves.png"),
                (f"{model} test metrics", config.results(model) / "metrics.json"),
                (f"{model} test captions", config.results(model) / "captions.csv"),
            )
        ],
        *[
            entry
            for model in attended
            for entry in (
                (f"{model} attention overlays (test images)", config.results(model) / "attention"),
                (f"{model} attention during training", config.run(model) / "attention"),
            )
        ],
        ("captions of the fresh images", config.fresh_captions),
        *[(f"{model} test report", config.results(model) / REPORT_NAME) for model in result.models],
    ]
    width = max(len(label) for label, _ in entries)
    return "\n".join(f"  {label:<{width}}  {path}" for label, path in entries)
