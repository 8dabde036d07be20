"""`captioner train` (and train_decoder.py): phase 2, a decoder trained from a feature store."""

from __future__ import annotations

from collections.abc import Callable

import click

from captioner.cli.options import (
    apply_options,
    features_options,
    field_option,
    path_option,
    precision_option,
    progress_option,
)
from captioner.devices import DEVICES
from captioner.models import DECODERS
from captioner.object_store import store_location
from captioner.progress import Progress
from captioner.training import TrainConfig, train
from captioner.training.config import (
    METRIC_NAMES,
    MODEL_DEFAULTS,
    OBJECTIVES,
    PRELOAD,
    SCST_BASELINES,
    TRANSFORMER,
)


def _option(name: str, kind: type | click.ParamType, help: str):
    """An option whose default is TrainConfig's, so the two can never disagree."""
    return field_option(TrainConfig, name, kind, help)


def _model_default(name: str, objective: str = "xe") -> str:
    """The LSTMs' and the transformer's defaults of the option `name` for --help, e.g.
    "0.5 (LSTMs), 0.1 (transformer)" (MODEL_DEFAULTS: both LSTMs have the same)."""
    lstm, transformer = (
        MODEL_DEFAULTS[model].for_objective(objective)[name]
        for model in ("show-attend-tell", TRANSFORMER)
    )
    return f"{lstm:g} (LSTMs), {transformer:g} ({TRANSFORMER})"


# The decoders' sizes: (option, least value, help).
_SIZES = (
    ("embed_size", 1, "LSTMs: word embedding size."),
    ("hidden_size", 1, "LSTMs: hidden size."),
    ("attention_size", 1, "Show-attend-tell: attention projection size."),
    (
        "d_model",
        1,
        "Transformer: width of the word embeddings and of every layer (--embed-size and"
        " --hidden-size are the LSTMs').",
    ),
    ("layers", 1, "Transformer: decoder layers."),
    ("heads", 1, "Transformer: attention heads (must divide --d-model)."),
    ("ff_size", 1, "Transformer: inner size of the feed-forward blocks."),
    (
        "encoder_layers",
        0,
        "Transformer: self-attention layers over the regions before the decoder reads them.",
    ),
)


def _size_options(command: Callable) -> Callable:
    """The decoders' size options, in _SIZES's order."""
    return apply_options(
        command, [_option(name, click.IntRange(min=least), help) for name, least, help in _SIZES]
    )


@click.command("train")
@features_options(
    "Feature store (.zarr, or s3://BUCKET/STORE.zarr) made by `captioner extract`; all that"
    " training needs."
)
@path_option(
    "--out",
    required=True,
    help="Run directory (runs/NAME): best.pt, last.pt, metrics.jsonl, curves.png, attention/.",
)
@_option(
    "model",
    click.Choice(list(DECODERS)),
    "Decoder: an LSTM without attention, an LSTM with soft attention, or a Transformer over the"
    " grid (README: which to pick).",
)
@_option(
    "objective",
    click.Choice(OBJECTIVES),
    "xe: cross entropy on the references. scst: self-critical training on sampled captions'"
    " CIDEr-D, from the cross-entropy checkpoint --init.",
)
@path_option(
    "--init",
    help="scst: the cross-entropy checkpoint (best.pt) to start from; the decoder's sizes and"
    " vocabulary are its.",
)
@_option("scst_samples", click.IntRange(min=2), "scst: captions sampled per image each step.")
@_option(
    "scst_baseline",
    click.Choice(SCST_BASELINES),
    "scst: reward baseline, the mean of the image's other samples or its greedy decode's.",
)
@_option("epochs", click.IntRange(min=1), "Epochs to train (in all, counting resumed ones).")
@_option(
    "batch_size",
    click.IntRange(min=1),
    "Captions per batch (whole images; scst: those images, each sampled --scst-samples times).",
)
@_option(
    "captions_per_image",
    click.IntRange(min=0),
    "Captions drawn per image each epoch (0: all, sharing one feature read).",
)
@_size_options
@click.option(
    "--dropout",
    type=click.FloatRange(0, 1, max_open=True),
    help="Dropout (LSTMs: before the output layer; transformer: also on every sublayer and the"
    f" inputs). Default: {_model_default('dropout')}; scst: none.",
)
@click.option(
    "--lr",
    type=click.FloatRange(0, min_open=True),
    help="Adam learning rate (reached after the warm-up). Default: xe"
    f" {_model_default('lr')}; scst {_model_default('lr', 'scst')}.",
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    help="Raise the learning rate linearly to --lr over this many steps (0: --lr from the"
    " first). Default: xe"
    f" {_model_default('warmup_steps')}; scst 0.",
)
@_option("label_smoothing", click.FloatRange(0, 1, max_open=True), "Label smoothing (xe).")
@_option("grad_clip", click.FloatRange(0), "Clip the gradient norm to this (0: no clipping).")
@_option("alpha_c", click.FloatRange(0), "Doubly stochastic attention regularization weight.")
@_option("min_count", click.IntRange(min=1), "Vocabulary: words seen fewer times become <unk>.")
@_option("max_length", click.IntRange(min=1), "Words kept per caption; longest greedy decode.")
@_option("device", click.Choice(DEVICES), "Where to train.")
@precision_option(TrainConfig)
@_option(
    "workers",
    click.IntRange(min=0),
    "Threads that read and assemble batches ahead of the step (0: read in the loop). Default:"
    " 4 on a GPU; on a CPU 1 where the step's threads leave a CPU idle, else 0.",
)
@click.option(
    "--preload",
    type=click.Choice(PRELOAD),
    is_flag=False,
    flag_value="ram",
    default=TrainConfig.preload,
    show_default=True,
    help="Hold the spatial maps in RAM (--preload, --preload ram) or in the GPU's memory"
    " (--preload gpu, refused when they do not fit) instead of streaming shards.",
)
@click.option(
    "--bucket-by-length",
    is_flag=True,
    help="Attention model: batch images whose longest captions are alike (fewer padded steps).",
)
@click.option(
    "--native-attention/--no-native-attention",
    default=TrainConfig.native_attention,
    show_default=True,
    help="Attention model on a CPU: compute the attention scores with a C loop compiled on first"
    " use (cached); without a C compiler, or with --no-native-attention, PyTorch's ops.",
)
@_option(
    "early_stop",
    click.IntRange(min=0),
    "Stop after N epochs without a better val BLEU-4 (CIDEr-D for scst).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@_option("seed", int, "Seed of initialization, shuffling and dropout.")
@path_option(
    "--captions",
    help="Caption file overriding the store's own corpus (joined to its images by path).",
)
@_option(
    "checkpoint_minutes",
    click.FloatRange(0),
    "Also write last.pt mid-epoch this often (single process).",
)
@progress_option
def train_command(progress: Progress, **options) -> None:
    """Train a caption decoder from a feature store (launch with torchrun for several processes)."""
    options["features"] = store_location(
        options["features"], options.pop("storage_options"), options.pop("cache")
    )
    result = train(TrainConfig(**options), progress)
    if result.rank != 0 or result.preempted or not result.history:
        return  # (a preempted run has said how to resume)
    final = result.history[-1]
    if result.stopped_early:
        click.echo(f"stopped early after epoch {final['epoch']}")
    name = METRIC_NAMES[result.selection_metric]
    click.echo(
        f"best val {name} {result.best_score:.4f} at epoch {result.best_epoch}: "
        f"{result.best_checkpoint}\nlast epoch {final['epoch']}: {result.last_checkpoint}"
    )
