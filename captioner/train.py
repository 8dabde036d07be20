"""Phase 2: train a caption decoder from a feature store, in one loop a newcomer can read.

The store alone is enough: the vocabulary is built from the train split of the corpus stored in it
(or of `captions`, a caption file joined to the store's images by path). Each epoch trains on the
train split (captioner.batches streams it), then measures validation loss and BLEU-4 on greedy
decodes of the val split. Everything goes to `out`:

    best.pt        the weights with the best validation BLEU-4 (captioning needs only this file)
    last.pt        the same plus optimizer, loss-scaler and RNG state and the position in the epoch
    metrics.jsonl  one row per epoch;  curves.png  loss and BLEU-4 per epoch
    vocab.json     the vocabulary;     attention/  per-word attention maps of a sample caption

Resume is exact. The batch order is a pure function of (seed, epoch, rank), and last.pt holds the
RNG state of the step at which it was written, so a run killed at any point (SIGKILL included)
and resumed with the same options ends with the same weights and metrics as an uninterrupted run
on the same device. last.pt is written at every epoch end and, in a single process, also mid-epoch
every `checkpoint_minutes`; every write is atomic.

Launched by torchrun (WORLD_SIZE > 1) the decoder is wrapped in DistributedDataParallel (NCCL on
CUDA, gloo on CPU); each rank reads its own part of the store, and rank 0 validates and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioner import visualize
from captioner.batches import FeatureStream, StreamConfig, encode_captions
from captioner.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from captioner.corpus import UNASSIGNED, CaptionRecord, Corpus, ImageRecord, read_corpus
from captioner.decode import greedy_decode
from captioner.devices import DEVICES, resolve_device
from captioner.distributed import Ranks, process_group
from captioner.errors import CaptionerError
from captioner.images import ImageError, load_image
from captioner.metrics import corpus_bleu4
from captioner.models import DECODERS, CaptionDecoder, DecoderConfig, LossOutput, build_decoder
from captioner.store import STATUS_DONE, FeatureStore
from captioner.text import Vocabulary

# Options that may change when a run is resumed; any other change is refused (it would silently
# make the resumed run a different run).
RESUMABLE_CHANGES = frozenset(
    {
        "features",
        "out",
        "epochs",
        "early_stop",
        "device",
        "workers",
        "preload",
        "resume",
        "captions",
        "checkpoint_minutes",
    }
)


@dataclass
class TrainConfig:
    features: Path  # the feature store (.zarr)
    out: Path  # run directory, e.g. runs/NAME
    model: str = "show-attend-tell"  # "show-tell" | "show-attend-tell"
    epochs: int = 20
    batch_size: int = 32  # captions per batch (whole images: batch_size // captions per image)
    captions_per_image: int = 0  # captions drawn per image each epoch; 0 = all of them
    embed_size: int = 512
    hidden_size: int = 512
    attention_size: int = 512
    dropout: float = 0.5
    lr: float = 4e-4
    label_smoothing: float = 0.1
    grad_clip: float = 5.0  # max gradient norm; 0 = no clipping
    alpha_c: float = 1.0  # doubly stochastic attention regularization (attention model only)
    min_count: int = 5  # words seen fewer times in the train split become <unk>
    max_length: int = 20  # words kept per caption, and the longest greedy decode
    device: str = "auto"  # auto | cpu | cuda | mps
    workers: int = 2  # feature-reading threads; 0 reads in the training thread
    preload: bool = False  # hold the spatial maps in RAM instead of streaming shards
    early_stop: int = 0  # stop after this many epochs without a better val BLEU-4; 0 = never
    resume: bool = False  # continue the run in `out` from last.pt
    seed: int = 0
    captions: Path | None = None  # caption file overriding the store's corpus (joined by path)
    checkpoint_minutes: float = 10.0  # also write last.pt mid-epoch this often; 0 = every step


@dataclass
class TrainResult:
    out: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict]  # the metrics.jsonl rows
    best_epoch: int
    best_bleu4: float
    stopped_early: bool
    rank: int = 0  # under torchrun every process returns a result; rank 0 wrote the files


@dataclass
class RunState:
    """Where a run stands: what last.pt records besides the weights and the optimizer."""

    epoch: int = 0  # the epoch in progress, 0-based (equals the epochs done at an epoch end)
    step: int = 0  # batches of `epoch` already trained
    loss_sum: float = 0.0  # training objective of `epoch` so far, summed over target tokens
    nll_sum: float = 0.0  # unsmoothed negative log-likelihood of `epoch` so far
    tokens: int = 0
    history: list[dict] = field(default_factory=list)
    best_bleu4: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0

    def early_stopped(self, patience: int) -> bool:
        return patience > 0 and self.epochs_without_improvement >= patience


def train(config: TrainConfig, progress: bool = False) -> TrainResult:
    """Train (or resume) the run `config` describes; see the module docstring."""
    _check_options(config)
    ranks = Ranks.from_environment()
    device = resolve_device(config.device, ranks.local_rank)
    with process_group(ranks, device):
        return _train(config, ranks, device, progress)


def _train(config: TrainConfig, ranks: Ranks, device: torch.device, progress: bool) -> TrainResult:
    say = tqdm.write if progress and ranks.is_main else _silent
    out, last_path = Path(config.out), Path(config.out) / "last.pt"
    store = FeatureStore.open(config.features)
    corpus = training_corpus(store, config.captions)
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), config.min_count)
    train_rows, val_rows = (_split_rows(corpus, store, split) for split in ("train", "val"))
    for split, rows in (("train", train_rows), ("val", val_rows)):
        if len(rows) == 0:
            raise CaptionerError(f"{store.path}: no {split} images with features and captions")

    torch.manual_seed(config.seed)
    decoder_config = DecoderConfig(
        config.model, len(vocabulary), store.channels, config.embed_size, config.hidden_size,
        config.attention_size, config.dropout,
    )  # fmt: skip
    decoder = build_decoder(decoder_config).to(device)
    run = _Run(config, ranks, device, store, vocabulary, decoder)
    state = RunState()
    if config.resume:
        state = _resume(run, last_path)
    elif last_path.exists():
        raise CaptionerError(
            f"{out}: already holds a run; pass --resume to continue it or choose another --out"
        )

    kind = decoder.feature_kind
    train_stream = _stream(store, corpus, vocabulary, train_rows, config, kind, device, ranks)
    val_stream = _stream(store, corpus, vocabulary, val_rows, config, kind, device, None)
    by_image = corpus.captions_by_image()
    references = {row: [list(corpus.captions[c].tokens) for c in by_image[row]] for row in val_rows}
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        vocabulary.save(out / "vocab.json")
        _write_metrics(out, state.history)
    say(
        f"training {config.model} on {store.path} ({len(train_rows)} train, {len(val_rows)} val"
        f" images, vocabulary {len(vocabulary)}) on {device}"
        + (f" x {ranks.world_size} ranks" if ranks.world_size > 1 else "")
    )

    while state.epoch < config.epochs and not state.early_stopped(config.early_stop):
        timing = _train_epoch(run, train_stream, state, progress)
        row = None
        if ranks.is_main:
            validation = _validate(run, val_stream, references)
            row = _epoch_row(state, timing, validation, ranks)
            _record_sample(out, store, corpus, decoder, validation, state.epoch + 1)
        row = ranks.broadcast(row)
        state.history.append(row)
        state.epoch, state.step = row["epoch"], 0
        state.loss_sum, state.nll_sum, state.tokens = 0.0, 0.0, 0
        improved = row["val_bleu4"] > state.best_bleu4
        if improved:
            state.best_bleu4, state.best_epoch = row["val_bleu4"], row["epoch"]
            state.epochs_without_improvement = 0
            run.save(out / "best.pt", state)
        else:
            state.epochs_without_improvement += 1
        run.save(last_path, state, resumable=True)
        if ranks.is_main:
            _write_metrics(out, state.history)
            say(_describe(row, improved, config.epochs))
            if row["repeating_captions"]:
                say(
                    f"warning: {row['repeating_captions']} validation captions repeat a word 3+"
                    f" times in a row (e.g. {row['repeating_example']!r}): the decoder may be"
                    " collapsing"
                )

    stopped_early = state.early_stopped(config.early_stop) and state.epoch < config.epochs
    if stopped_early:
        say(f"early stop: no better validation BLEU-4 for {config.early_stop} epochs")
    return TrainResult(
        out, out / "best.pt", last_path, state.history, state.best_epoch, state.best_bleu4,
        stopped_early, ranks.rank,
    )  # fmt: skip


# ---- the parts of a run ----


class _Run:
    """What every step of a run uses: its config and process, the decoder and its optimizer,
    and the store and vocabulary that every checkpoint records."""

    def __init__(
        self, config: TrainConfig, ranks: Ranks, device: torch.device, store: FeatureStore,
        vocabulary: Vocabulary, decoder: CaptionDecoder,
    ) -> None:  # fmt: skip
        self.config, self.ranks, self.device = config, ranks, device
        self.store, self.vocabulary, self.decoder = store, vocabulary, decoder
        self.optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)
        self.amp = Amp(device)
        # The loss as forward(), which is what DistributedDataParallel synchronizes.
        self.model: nn.Module = _LossModel(decoder, config.label_smoothing, config.alpha_c)
        if ranks.world_size > 1:
            self.model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )

    def save(self, path: Path, state: RunState, resumable: bool = False) -> None:
        """Write best.pt / last.pt from rank 0. A resumable (last.pt) checkpoint also holds the
        optimizer, the loss scaler and every rank's RNG state, so all ranks must call it."""
        rng_states = self.ranks.gather(_rng_state()) if resumable else []
        if not self.ranks.is_main:
            return
        checkpoint = Checkpoint(
            decoder_config=self.decoder.config,
            state_dict=self.decoder.state_dict(),
            vocabulary=self.vocabulary,
            encoder_config=self.store.encoder_config,
            store_fingerprint=self.store.fingerprint,
            grid=self.store.grid,
            training={
                "epoch": state.epoch,
                "step": state.step,
                "metrics": state.history[-1] if state.history else {},
                "options": _options(self.config),
            },
        )
        extra = None
        if resumable:
            extra = {
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.amp.scaler.state_dict(),
                "rng": rng_states,
                "world_size": self.ranks.world_size,
                "state": asdict(state),
            }
        save_checkpoint(path, checkpoint, extra)


class _LossModel(nn.Module):
    """The training loss as `forward`, which is what DistributedDataParallel synchronizes."""

    def __init__(self, decoder: CaptionDecoder, label_smoothing: float, alpha_c: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.label_smoothing, self.alpha_c = label_smoothing, alpha_c

    def forward(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> LossOutput:
        return self.decoder.training_loss(
            features, image_index, captions, lengths, self.label_smoothing, self.alpha_c
        )


# ---- one epoch of training ----


@dataclass
class _EpochTiming:
    seconds: float
    data_wait: float  # seconds spent waiting for the next batch
    captions: int


def _train_epoch(run: _Run, stream: FeatureStream, state: RunState, progress: bool) -> _EpochTiming:
    """Train `state.epoch` from batch `state.step` on; updates `state` as it goes."""
    config, ranks, amp, optimizer = run.config, run.ranks, run.amp, run.optimizer
    run.model.train()
    sums = torch.tensor([state.loss_sum, state.nll_sum], dtype=torch.float32, device=run.device)
    bar = tqdm(
        total=stream.num_captions(state.epoch, state.step),
        unit="cap",
        unit_scale=True,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        leave=False,
        disable=not (progress and ranks.is_main),
    )
    mid_epoch_saves = ranks.world_size == 1  # ranks would have to agree on when to stop and save
    started = last_save = time.perf_counter()
    data_wait, captions = 0.0, 0
    batches = stream.epoch(state.epoch, start_batch=state.step)
    while True:
        waiting = time.perf_counter()
        batch = next(batches, None)
        data_wait += time.perf_counter() - waiting
        if batch is None:
            break
        batch = batch.to(run.device)
        with amp.autocast():
            output = run.model(batch.features, batch.image_index, batch.captions, batch.lengths)
        optimizer.zero_grad(set_to_none=True)
        amp.scaler.scale(output.loss).backward()
        if config.grad_clip > 0:
            amp.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(run.decoder.parameters(), config.grad_clip)
        amp.scaler.step(optimizer)
        amp.scaler.update()

        sums += torch.stack([output.loss.detach().float() * output.tokens, output.nll_sum.detach()])
        state.tokens += output.tokens
        state.step += 1
        captions += batch.num_captions
        bar.update(batch.num_captions)
        if progress and state.step % 25 == 0:
            bar.set_postfix(loss=f"{output.loss.item():.3f}")
        now = time.perf_counter()
        if mid_epoch_saves and now - last_save >= config.checkpoint_minutes * 60:
            state.loss_sum, state.nll_sum = (float(x) for x in sums.tolist())
            run.save(Path(config.out) / "last.pt", state, resumable=True)
            last_save = time.perf_counter()
    bar.close()
    state.loss_sum, state.nll_sum, state.tokens = ranks.sum(
        [*(float(x) for x in sums.tolist()), state.tokens]
    )
    return _EpochTiming(time.perf_counter() - started, data_wait, int(ranks.sum([captions])[0]))


# ---- validation ----


@dataclass
class Validation:
    loss: float  # mean unsmoothed NLL per target token
    bleu4: float  # corpus BLEU-4 of greedy decodes against all references
    hypotheses: dict[int, list[str]]  # store row -> decoded words
    sample_row: int
    sample_attention: np.ndarray | None  # (words, L) for the attention model


@torch.no_grad()
def _validate(
    run: _Run, stream: FeatureStream, references: dict[int, list[list[str]]]
) -> Validation:
    """Validation loss and greedy-decode BLEU-4 over every image of `stream` (in row order)."""
    decoder, vocabulary = run.decoder, run.vocabulary
    decoder.eval()
    nll_sum, tokens = 0.0, 0
    hypotheses: dict[int, list[str]] = {}
    sample: tuple[int, np.ndarray | None] | None = None
    for batch in stream.epoch(0):
        batch = batch.to(run.device)
        with run.amp.autocast():
            output = decoder.training_loss(
                batch.features, batch.image_index, batch.captions, batch.lengths
            )
            generated = greedy_decode(decoder, batch.features, run.config.max_length)
        nll_sum, tokens = nll_sum + float(output.nll_sum), tokens + output.tokens
        for row, caption in zip(batch.rows.tolist(), generated, strict=True):
            hypotheses[row] = vocabulary.decode(caption.tokens)
            if sample is None:
                sample = (row, caption.attention)
    decoder.train()
    rows = sorted(hypotheses)
    bleu4 = corpus_bleu4([references[r] for r in rows], [hypotheses[r] for r in rows])
    return Validation(nll_sum / max(tokens, 1), bleu4, hypotheses, *sample)


def repeated_word(words: list[str], times: int = 3) -> str | None:
    """The first word that occurs `times` or more times in a row (a sign of decoder collapse)."""
    run = 1
    for previous, word in zip(words, words[1:], strict=False):
        run = run + 1 if word == previous else 1
        if run >= times:
            return word
    return None


def _epoch_row(state: RunState, timing: _EpochTiming, validation: Validation, ranks: Ranks) -> dict:
    repeating = [words for words in validation.hypotheses.values() if repeated_word(words)]
    tokens = max(state.tokens, 1)
    return {
        "epoch": state.epoch + 1,
        # Losses are mean negative log-likelihood per target token, train and val alike; the
        # objective adds label smoothing and the attention penalty to the train one.
        "objective": state.loss_sum / tokens,
        "train_loss": state.nll_sum / tokens,
        "train_ppl": _perplexity(state.nll_sum / tokens),
        "val_loss": validation.loss,
        "val_ppl": _perplexity(validation.loss),
        "val_bleu4": validation.bleu4,
        "sample": " ".join(validation.hypotheses[validation.sample_row]),
        "repeating_captions": len(repeating),
        "repeating_example": " ".join(repeating[0]) if repeating else "",
        "captions_per_s": timing.captions / max(timing.seconds, 1e-9),
        "data_wait": timing.data_wait / max(timing.seconds, 1e-9),  # of rank 0
        "seconds": timing.seconds,
        "ranks": ranks.world_size,
    }


def _perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 50.0))


def _describe(row: dict, improved: bool, epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}  objective {row['objective']:.3f}"
        f"  train loss {row['train_loss']:.3f} ppl {row['train_ppl']:.1f}"
        f"  val loss {row['val_loss']:.3f} ppl {row['val_ppl']:.1f}  BLEU-4 {row['val_bleu4']:.4f}"
        f"{' (best)' if improved else ''}  {row['captions_per_s']:.0f} captions/s"
        f"  data wait {100 * row['data_wait']:.1f}%\n  sample: {row['sample']}"
    )


def _record_sample(
    out: Path,
    store: FeatureStore,
    corpus: Corpus,
    decoder: CaptionDecoder,
    validation: Validation,
    epoch: int,
) -> None:
    """The sample caption's per-word attention maps (attention model only) as a PNG: overlaid on
    the image when it is reachable under the store's recorded image root, else as grid heatmaps."""
    if validation.sample_attention is None:
        return
    words = validation.hypotheses[validation.sample_row]
    image = None
    root = store.attrs.get("images_root")
    if root:
        with contextlib.suppress(ImageError, OSError):
            image = load_image(Path(root) / corpus.images[validation.sample_row].path)
    path = out / "attention" / f"epoch_{epoch:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    attention = validation.sample_attention[: len(words)]
    visualize.save_attention_figure(path, words, attention, store.grid, image)


def _write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl and curves.png from the whole history (rewritten atomically each epoch, so a
    run killed between two writes never leaves a duplicate or a missing row after resume)."""
    temporary = out / ".metrics.jsonl.tmp"
    temporary.write_text("".join(json.dumps(row) + "\n" for row in history), "utf-8")
    os.replace(temporary, out / "metrics.jsonl")
    if history:
        visualize.save_training_curves(out / "curves.png", history)


# ---- data ----


def training_corpus(store: FeatureStore, captions: Path | None) -> Corpus:
    """The store's corpus, or the caption file `captions` joined to the store's rows by image path
    (the images keep the store's row order; store images the file lacks get no captions)."""
    corpus = store.corpus()
    if captions is None:
        return corpus
    override = read_corpus([Path(captions)])
    row_of = {image.path: row for row, image in enumerate(corpus.images)}
    split_of = {image.path: image.split for image in override.images}
    images = [
        ImageRecord(image.id, image.path, split_of.get(image.path, UNASSIGNED))
        for image in corpus.images
    ]
    joined = [
        CaptionRecord(row_of[override.images[c.image].path], c.raw, c.tokens)
        for c in override.captions
        if override.images[c.image].path in row_of
    ]
    if not joined:
        raise CaptionerError(f"{captions}: none of its images are in the store {store.path}")
    return Corpus(override.format, override.sources, images, joined, override.skipped)


def _split_rows(corpus: Corpus, store: FeatureStore, split: str) -> np.ndarray:
    """Rows of `split` whose features are done and that have at least one caption."""
    done = store.status() == STATUS_DONE
    captioned = np.zeros(len(corpus.images), dtype=bool)
    captioned[[c.image for c in corpus.captions]] = True
    in_split = np.array([image.split == split for image in corpus.images], dtype=bool)
    return np.flatnonzero(done & captioned & in_split)


def _stream(
    store: FeatureStore,
    corpus: Corpus,
    vocabulary: Vocabulary,
    rows: np.ndarray,
    config: TrainConfig,
    kind: str,
    device: torch.device,
    ranks: Ranks | None,
) -> FeatureStream:
    """The training stream (this rank's shuffled part) or, with `ranks` None, the validation one."""
    training = ranks is not None
    stream_config = StreamConfig(
        kind=kind,
        batch_size=config.batch_size,
        captions_per_image=config.captions_per_image if training else 0,
        shuffle=training,
        preload=config.preload,
        workers=config.workers,
        seed=config.seed,
        rank=ranks.rank if training else 0,
        world_size=ranks.world_size if training else 1,
        # Half-precision maps cross to a GPU at half the bytes; the decoders upcast them there.
        dtype=torch.float16 if device.type == "cuda" and kind == "spatial" else torch.float32,
        pin_memory=device.type == "cuda",
    )
    captions = encode_captions(corpus, vocabulary, rows.tolist(), config.max_length)
    return FeatureStream(store, rows, captions, stream_config)


# ---- checkpoints and resume ----


def _resume(run: _Run, path: Path) -> RunState:
    """Load last.pt into the decoder, optimizer and RNGs, after checking it is the same run."""
    if not path.is_file():
        raise CaptionerError(f"{path}: nothing to resume (no last.pt in {path.parent})")
    config, store, ranks = run.config, run.store, run.ranks
    checkpoint, extra = load_checkpoint(path)
    if checkpoint.store_fingerprint != store.fingerprint:
        raise CaptionerError(
            f"{store.path}: its features do not match the run being resumed ({path} was trained"
            f" on store {checkpoint.store_fingerprint}, this store is {store.fingerprint})"
        )
    if "state" not in extra:
        raise CaptionerError(f"{path}: holds no resume state (was it copied from a best.pt?)")
    saved, current = checkpoint.training["options"], _options(config)
    changed = [
        f"--{name.replace('_', '-')} {saved.get(name)} -> {current[name]}"
        for name in current
        if name not in RESUMABLE_CHANGES and saved.get(name) != current[name]
    ]
    if changed:
        raise CaptionerError(
            f"{path}: resume with the options the run started with; changed: {', '.join(changed)}"
        )
    if checkpoint.vocabulary.words != run.vocabulary.words:
        raise CaptionerError(
            f"{config.captions or store.path}: the captions give another vocabulary than the run"
            " being resumed"
        )
    if extra["world_size"] != ranks.world_size:
        raise CaptionerError(
            f"{path}: the run used {extra['world_size']} processes; resume it with as many"
        )
    run.decoder.load_state_dict(checkpoint.state_dict)
    run.optimizer.load_state_dict(extra["optimizer"])
    if run.amp.scaler.is_enabled() and extra["scaler"]:
        run.amp.scaler.load_state_dict(extra["scaler"])
    _set_rng_state(extra["rng"][ranks.rank], run.device)
    return RunState(**extra["state"])


def _options(config: TrainConfig) -> dict:
    """The config as plain values (paths as text), as checkpoints store it."""
    return {
        name: str(value) if isinstance(value, Path) else value
        for name, value in asdict(config).items()
    }


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# ---- precision and processes ----


class Amp:
    """Mixed precision on CUDA only: bfloat16 where supported (no loss scaling needed), else
    float16 with a gradient scaler. Elsewhere both are no-ops."""

    def __init__(self, device: torch.device) -> None:
        self.dtype = None
        if device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)


def _check_options(config: TrainConfig) -> None:
    """Bad option values as one-line errors before any work starts."""
    problems = {
        "model": config.model not in DECODERS,
        "device": config.device not in DEVICES,
        "epochs": config.epochs < 1,
        "batch-size": config.batch_size < 1,
        "captions-per-image": config.captions_per_image < 0,
        "embed-size": config.embed_size < 1,
        "hidden-size": config.hidden_size < 1,
        "attention-size": config.attention_size < 1,
        "dropout": not 0 <= config.dropout < 1,
        "lr": not config.lr > 0,
        "label-smoothing": not 0 <= config.label_smoothing < 1,
        "grad-clip": config.grad_clip < 0,
        "alpha-c": config.alpha_c < 0,
        "min-count": config.min_count < 1,
        "max-length": config.max_length < 1,
        "workers": config.workers < 0,
        "early-stop": config.early_stop < 0,
        "checkpoint-minutes": config.checkpoint_minutes < 0,
    }
    for name, bad in problems.items():
        if bad:
            value = getattr(config, name.replace("-", "_"))
            raise CaptionerError(f"--{name}: {value!r} is not a valid value")


def _silent(_: str) -> None:
    pass
