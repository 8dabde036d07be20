"""What a training run is told (`TrainConfig`), what it returns (`TrainResult`), the one place
where option values are checked and the model- and objective-dependent defaults are filled in,
and the decoder sizes a config stands for (`decoder_config`, `size_options`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from captioner.devices import DEVICES
from captioner.errors import CaptionerError
from captioner.models import DECODERS, DecoderConfig
from captioner.option_checks import above, at_least, check_options, fraction, one_of, optional
from captioner.precision import PRECISIONS
from captioner.store import StoreLocation

OBJECTIVES = ("xe", "scst")
PRELOAD = ("none", "ram", "gpu")
SCST_BASELINES = ("mean", "greedy")
TRANSFORMER = "transformer"


@dataclass(frozen=True)
class ModelDefaults:
    """What --dropout, --lr and --warmup-steps become for a kind of decoder when not given."""

    dropout: float  # cross entropy (self-critical runs use none)
    lr: dict[str, float]  # Adam's rate (after the warm-up) for each objective
    # Cross entropy only: a self-critical run starts from trained weights and needs none.
    warmup_steps: int

    def for_objective(self, objective: str) -> dict:
        """The filled-in values of the three options for a run of `objective`."""
        return {
            "dropout": self.dropout,
            "lr": self.lr[objective],
            "warmup_steps": self.warmup_steps if objective == "xe" else 0,
        }


# The LSTMs: the common cross-entropy rate, and the rate self-critical fine-tuning uses in
# practice (ruotianluo/self-critical.pytorch configs), at a constant rate as they always trained.
# The transformer: dropout 0.1 as in Vaswani et al. and ruotianluo's transformer config; 3e-4,
# the peak of that config's schedule (512^-0.5 * 20000^-0.5), after a warm-up of 1000 steps
# (under 3 Flickr8k epochs at the default batch, a seventh of a COCO epoch: the pre-LN layers
# need far less than that config's post-LN 20000); self-critical at 1e-5, its SCST rate.
# README "Which decoder" says how these were chosen.
MODEL_DEFAULTS = {
    "show-tell": ModelDefaults(dropout=0.5, lr={"xe": 4e-4, "scst": 5e-5}, warmup_steps=0),
    "show-attend-tell": ModelDefaults(dropout=0.5, lr={"xe": 4e-4, "scst": 5e-5}, warmup_steps=0),
    TRANSFORMER: ModelDefaults(dropout=0.1, lr={"xe": 3e-4, "scst": 1e-5}, warmup_steps=1000),
}
# The metrics.jsonl column that picks best.pt (and early stopping) for each objective: what it
# optimizes, validation BLEU-4 for cross entropy and CIDEr-D for SCST; and the columns' names.
SELECTION_METRIC = {"xe": "val_bleu4", "scst": "val_cider"}
METRIC_NAMES = {"val_bleu4": "BLEU-4", "val_cider": "CIDEr-D"}


@dataclass
class TrainConfig:
    features: StoreLocation  # the feature store (.zarr folder, or a RemoteStore)
    out: Path  # run directory, e.g. runs/NAME
    model: str = "show-attend-tell"  # "show-tell" | "show-attend-tell" | "transformer"
    # "xe": cross entropy on the reference captions; "scst": self-critical sequence training,
    # which maximizes the CIDEr-D of sampled captions, starting from the `init` checkpoint.
    objective: str = "xe"
    init: Path | None = None  # scst: the cross-entropy checkpoint (best.pt) to start from
    scst_samples: int = 5  # scst: captions sampled per image each step
    scst_baseline: str = "mean"  # scst: "mean" of the image's other samples' rewards | "greedy"
    epochs: int = 20
    # Captions per batch (whole images: batch_size // captions per image): 16 images x 5 captions
    # as neuraltalk2; 2.5x the 32 of the common tutorial keeps a CPU's matrix units busier.
    batch_size: int = 80
    captions_per_image: int = 0  # captions drawn per image each epoch; 0 = all of them
    # The sizes, dropout and min_count of an scst run are its init's. The LSTMs' sizes:
    embed_size: int = 512
    hidden_size: int = 512
    attention_size: int = 512
    # The transformer's: its width (word embeddings and every layer; embed_size and hidden_size
    # are the LSTMs' alone), decoder layers, attention heads (d_model / heads wide each), the
    # feed-forward blocks' inner size, and self-attention layers over the regions (0: the decoder
    # reads the projected regions directly).
    d_model: int = 512
    layers: int = 3
    heads: int = 8
    ff_size: int = 2048
    encoder_layers: int = 1
    # None, for these three: the model's default for the objective (MODEL_DEFAULTS).
    dropout: float | None = None
    lr: float | None = None  # Adam's rate (after the warm-up)
    # The rate rises linearly to `lr` over this many optimizer steps, then stays
    # (captioner.training.schedule); 0: `lr` from the first step.
    warmup_steps: int | None = None
    label_smoothing: float = 0.1  # xe only
    grad_clip: float = 5.0  # max gradient norm; 0 = no clipping
    alpha_c: float = 1.0  # doubly stochastic attention regularization (xe, attention model)
    min_count: int = 5  # words seen fewer times in the train split become <unk>
    max_length: int = 20  # words kept per caption, and the longest greedy decode or sample
    device: str = "auto"  # auto | cpu | cuda | mps
    # auto | float32 | bfloat16 (captioner.precision); auto picks per decoder what is faster
    precision: str = "auto"
    # Threads that read and assemble batches ahead of the step; 0 reads in the training loop.
    # None: training.data.reader_threads decides by the device and the CPUs available.
    workers: int | None = None
    # Where the spatial maps are held instead of streaming shards: "none" (stream), "ram", or
    # "gpu" (the CUDA device trained on, when they fit beside what training needs).
    preload: str = "none"
    early_stop: int = 0  # stop after this many epochs without a better selection score; 0 = never
    resume: bool = False  # continue the run in `out` from last.pt
    seed: int = 0
    captions: Path | None = None  # caption file overriding the store's corpus (joined by path)
    checkpoint_minutes: float = 10.0  # also write last.pt mid-epoch this often; 0 = every step
    # Attention model: batches of images whose longest captions are alike (fewer padded steps).
    # Off by default: on the demo's scenes it made batches of alike scenes and slowed learning.
    bucket_by_length: bool = False
    # Attention model on a CPU: the attention scores as a compiled C loop (built with the system's
    # C compiler on first use and cached; captioner.models.native_attention), 1.3x faster steps.
    # False, or where it cannot be built: PyTorch's ops. The two compute the same function.
    native_attention: bool = True

    @property
    def selection_metric(self) -> str:
        return SELECTION_METRIC[self.objective]


@dataclass
class TrainResult:
    out: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict]  # the metrics.jsonl rows
    best_epoch: int
    best_score: float  # the best epoch's `selection_metric`
    selection_metric: str
    stopped_early: bool
    rank: int = 0  # under torchrun every process returns a result; rank 0 wrote the files
    preempted: str = ""  # the signal (SIGTERM, SIGINT) that stopped it mid-epoch, if one did


# What each option accepts; the options not named here accept any value of their type.
_RULES = {
    "model": one_of(DECODERS),
    "objective": one_of(OBJECTIVES),
    "scst_baseline": one_of(SCST_BASELINES),
    "device": one_of(DEVICES),
    "precision": one_of(PRECISIONS),
    "lr": optional(above(0)),
    **dict.fromkeys(
        ["epochs", "batch_size", "embed_size", "hidden_size", "attention_size", "min_count"]
        + ["max_length", "d_model", "layers", "heads", "ff_size"],
        at_least(1),
    ),
    **dict.fromkeys(
        ["captions_per_image", "grad_clip", "alpha_c", "early_stop", "checkpoint_minutes"]
        + ["encoder_layers"],
        at_least(0),
    ),
    "warmup_steps": optional(at_least(0)),
    "dropout": optional(fraction()),
    "label_smoothing": fraction(),
    "workers": optional(at_least(0)),
    "preload": one_of(PRELOAD),
    # The mean baseline compares each sample with the image's others: it needs two.
    "scst_samples": at_least(2),
}


def checked_config(config: TrainConfig) -> TrainConfig:
    """`config` with its defaults filled in (the model's dropout, learning rate and warm-up for
    the objective, an absolute caption path for evaluate to find), or a one-line error for a bad
    value before any work starts."""
    check_options(config, _RULES)
    if (config.objective == "scst") != (config.init is not None):
        raise CaptionerError(
            "--objective scst starts from a cross-entropy checkpoint: pass --init runs/NAME/best.pt"
            if config.init is None
            else "--init: only --objective scst starts from a checkpoint (resume with --resume)"
        )
    if config.model == TRANSFORMER:
        _check_transformer_options(config)
    defaults = MODEL_DEFAULTS[config.model].for_objective(config.objective)
    unset = {name: value for name, value in defaults.items() if getattr(config, name) is None}
    captions = None if config.captions is None else Path(config.captions).resolve()
    init = None if config.init is None else Path(config.init).resolve()
    return replace(config, **unset, captions=captions, init=init)


def _check_transformer_options(config: TrainConfig) -> None:
    """The rules between the transformer's options, each broken one said in one line (its sizes
    only for cross entropy: a self-critical run takes its init's)."""
    if config.objective == "xe" and config.d_model % config.heads:
        raise CaptionerError(
            f"--d-model {config.d_model} is not divisible by --heads {config.heads}: each head"
            " is d_model / heads wide"
        )
    most_words = DecoderConfig.max_positions - 1  # the positions after <start>
    if config.max_length > most_words:
        raise CaptionerError(
            f"--max-length {config.max_length}: the transformer has positions for at most"
            f" {most_words} words"
        )


# Each model's size options and the DecoderConfig field each one sets: the transformer's width
# d_model is its hidden size (and its embedding size, which must equal it).
_SIZE_FIELDS = {
    "lstm": {
        "embed_size": "embed_size", "hidden_size": "hidden_size",
        "attention_size": "attention_size",
    },
    TRANSFORMER: {
        "d_model": "hidden_size", "layers": "decoder_layers", "heads": "heads",
        "ff_size": "ff_size", "encoder_layers": "encoder_layers",
    },
}  # fmt: skip


def _size_fields(model: str) -> dict[str, str]:
    return _SIZE_FIELDS[TRANSFORMER if model == TRANSFORMER else "lstm"]


def decoder_config(
    config: TrainConfig, vocab_size: int, feature_size: int, grid: tuple[int, int]
) -> DecoderConfig:
    """The decoder a (checked) `config` trains, for `vocab_size` words and features of
    `feature_size` channels on a `grid` of regions: the LSTMs' sizes, or the transformer's, whose
    width d_model is its embedding and hidden size and whose grid positions cover `grid`."""
    sizes = {field: getattr(config, option) for option, field in _size_fields(config.model).items()}
    if config.model == TRANSFORMER:
        sizes.update(
            embed_size=config.d_model, max_grid_side=max(DecoderConfig.max_grid_side, *grid)
        )
    return DecoderConfig(config.model, vocab_size, feature_size, dropout=config.dropout, **sizes)


def size_options(decoder: DecoderConfig) -> dict:
    """The TrainConfig size options `decoder_config` turns into `decoder` (its inverse)."""
    return {
        option: getattr(decoder, field) for option, field in _size_fields(decoder.model).items()
    }
