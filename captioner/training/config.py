"""What a training run is told (`TrainConfig`), what it returns (`TrainResult`), and the one place
where option values are checked and objective-dependent defaults are filled in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from captioner.devices import DEVICES
from captioner.errors import CaptionerError
from captioner.models import DECODERS
from captioner.option_checks import above, at_least, check_options, fraction, one_of, optional

OBJECTIVES = ("xe", "scst")
SCST_BASELINES = ("mean", "greedy")
# Adam's learning rate when --lr is not given: the common cross-entropy rate, and the rate
# self-critical fine-tuning uses in practice (ruotianluo/self-critical.pytorch configs).
DEFAULT_LR = {"xe": 4e-4, "scst": 5e-5}
# The metrics.jsonl column that picks best.pt (and early stopping) for each objective: what it
# optimizes, validation BLEU-4 for cross entropy and CIDEr-D for SCST; and the columns' names.
SELECTION_METRIC = {"xe": "val_bleu4", "scst": "val_cider"}
METRIC_NAMES = {"val_bleu4": "BLEU-4", "val_cider": "CIDEr-D"}


@dataclass
class TrainConfig:
    features: Path  # the feature store (.zarr)
    out: Path  # run directory, e.g. runs/NAME
    model: str = "show-attend-tell"  # "show-tell" | "show-attend-tell"
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
    embed_size: int = 512  # the sizes, dropout and min_count of an scst run are its init's
    hidden_size: int = 512
    attention_size: int = 512
    dropout: float = 0.5
    lr: float | None = None  # None: DEFAULT_LR of the objective
    label_smoothing: float = 0.1  # xe only
    grad_clip: float = 5.0  # max gradient norm; 0 = no clipping
    alpha_c: float = 1.0  # doubly stochastic attention regularization (xe, attention model)
    min_count: int = 5  # words seen fewer times in the train split become <unk>
    max_length: int = 20  # words kept per caption, and the longest greedy decode or sample
    device: str = "auto"  # auto | cpu | cuda | mps
    # Feature-reading threads; 0 reads in the training thread. None: 0 on a CPU, where reader
    # threads take cores from the step (it ran 30 % slower with 2), else 2.
    workers: int | None = None
    preload: bool = False  # hold the spatial maps in RAM instead of streaming shards
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
    "lr": optional(above(0)),
    **dict.fromkeys(
        ["epochs", "batch_size", "embed_size", "hidden_size", "attention_size", "min_count"]
        + ["max_length"],
        at_least(1),
    ),
    **dict.fromkeys(
        ["captions_per_image", "grad_clip", "alpha_c", "early_stop", "checkpoint_minutes"],
        at_least(0),
    ),
    "dropout": fraction(),
    "label_smoothing": fraction(),
    "workers": optional(at_least(0)),
    # The mean baseline compares each sample with the image's others: it needs two.
    "scst_samples": at_least(2),
}


def checked_config(config: TrainConfig) -> TrainConfig:
    """`config` with its defaults filled in (the objective's learning rate, an absolute caption
    path for evaluate to find), or a one-line error for a bad value before any work starts."""
    check_options(config, _RULES)
    if (config.objective == "scst") != (config.init is not None):
        raise CaptionerError(
            "--objective scst starts from a cross-entropy checkpoint: pass --init runs/NAME/best.pt"
            if config.init is None
            else "--init: only --objective scst starts from a checkpoint (resume with --resume)"
        )
    lr = DEFAULT_LR[config.objective] if config.lr is None else config.lr
    captions = None if config.captions is None else Path(config.captions).resolve()
    init = None if config.init is None else Path(config.init).resolve()
    return replace(config, lr=lr, captions=captions, init=init)
