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
every `checkpoint_minutes`; every write is atomic. SIGTERM (a scheduler's notice) or Ctrl-C ends
the step in hand (on every rank: they agree on the step), writes last.pt there with each rank's
loss sums, and returns `preempted`.

Launched by torchrun (WORLD_SIZE > 1) the decoder is wrapped in DistributedDataParallel (NCCL on
CUDA, gloo on CPU); each rank reads its own part of the store, and rank 0 validates and writes.

This module is the loop; the parts it uses live in captioner/training/ (data, run, resume,
validation, metrics_log), one concern a module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from captioner.batches import Batch, FeatureStream
from captioner.devices import DEVICES, resolve_device
from captioner.distributed import Ranks, process_group
from captioner.errors import CaptionerError
from captioner.models import DECODERS, DecoderConfig, LossOutput, build_decoder
from captioner.preemption import StopRequest
from captioner.store import FeatureStore, corpus_digest
from captioner.text import Vocabulary
from captioner.training.data import (
    feature_statistics,
    split_rows,
    training_corpus,
    training_stream,
    validation_stream,
)
from captioner.training.metrics_log import EpochTiming, describe_epoch, epoch_row, write_metrics
from captioner.training.resume import RunState, resume_run, save_run
from captioner.training.run import Run
from captioner.training.tensorboard import TensorBoardLog
from captioner.training.validation import (
    collapse_warning,
    reference_words,
    save_sample_attention,
    validate,
)


@dataclass
class TrainConfig:
    features: Path  # the feature store (.zarr)
    out: Path  # run directory, e.g. runs/NAME
    model: str = "show-attend-tell"  # "show-tell" | "show-attend-tell"
    epochs: int = 20
    # Captions per batch (whole images: batch_size // captions per image): 16 images x 5 captions
    # as neuraltalk2; 2.5x the 32 of the common tutorial keeps a CPU's matrix units busier.
    batch_size: int = 80
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
    # Feature-reading threads; 0 reads in the training thread. None: 0 on a CPU, where reader
    # threads take cores from the step (it ran 30 % slower with 2), else 2.
    workers: int | None = None
    preload: bool = False  # hold the spatial maps in RAM instead of streaming shards
    early_stop: int = 0  # stop after this many epochs without a better val BLEU-4; 0 = never
    resume: bool = False  # continue the run in `out` from last.pt
    seed: int = 0
    captions: Path | None = None  # caption file overriding the store's corpus (joined by path)
    checkpoint_minutes: float = 10.0  # also write last.pt mid-epoch this often; 0 = every step
    # Attention model: batches of images whose longest captions are alike (fewer padded steps).
    # Off by default: on the demo's scenes it made batches of alike scenes and slowed learning.
    bucket_by_length: bool = False


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
    preempted: str = ""  # the signal (SIGTERM, SIGINT) that stopped it mid-epoch, if one did


def train(config: TrainConfig, progress: bool = False) -> TrainResult:
    """Train (or resume) the run `config` describes; see the module docstring."""
    _check_options(config)
    if config.captions is not None:  # recorded in checkpoints: absolute, for evaluate to find
        config = replace(config, captions=Path(config.captions).resolve())
    ranks = Ranks.from_environment()
    device = resolve_device(config.device, ranks.local_rank)
    with process_group(ranks, device), StopRequest() as stop:
        return _train(config, ranks, device, stop, progress)


def _train(
    config: TrainConfig, ranks: Ranks, device: torch.device, stop: StopRequest, progress: bool
) -> TrainResult:
    say = tqdm.write if progress and ranks.is_main else _silent
    out, last_path = Path(config.out), Path(config.out) / "last.pt"
    store = FeatureStore.open(config.features)
    corpus = training_corpus(store, config.captions)
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), config.min_count)
    train_rows, val_rows = (split_rows(corpus, store, split) for split in ("train", "val"))
    for split, rows in (("train", train_rows), ("val", val_rows)):
        if len(rows) == 0:
            raise CaptionerError(f"{store.path}: no {split} images with features and captions")

    torch.manual_seed(config.seed)
    decoder_config = DecoderConfig(
        config.model, len(vocabulary), store.channels, config.embed_size, config.hidden_size,
        config.attention_size, config.dropout,
    )  # fmt: skip
    decoder = build_decoder(decoder_config)
    if not config.resume:  # a resumed run takes its statistics from the checkpoint
        decoder.set_feature_statistics(*feature_statistics(store, train_rows, decoder.feature_kind))
    decoder = decoder.to(device)
    seed_rank(config.seed, ranks.rank)
    run = Run(config, ranks, device, store, vocabulary, decoder, corpus_digest(corpus))
    state = RunState()
    if config.resume:
        state = resume_run(run, last_path)
    elif last_path.exists():
        raise CaptionerError(
            f"{out}: already holds a run; pass --resume to continue it or choose another --out"
        )

    kind = decoder.feature_kind
    train_stream = training_stream(
        store, corpus, vocabulary, train_rows, config, kind, device, ranks
    )
    if ranks.is_main:  # only rank 0 validates and writes
        val_stream = validation_stream(store, corpus, vocabulary, val_rows, config, kind, device)
        references = reference_words(corpus, val_rows)
        out.mkdir(parents=True, exist_ok=True)
        vocabulary.save(out / "vocab.json")
        write_metrics(out, state.history)
    say(
        f"training {config.model} on {store.path} ({len(train_rows)} train, {len(val_rows)} val"
        f" images, vocabulary {len(vocabulary)}) on {device}"
        + (f" x {ranks.world_size} ranks" if ranks.world_size > 1 else "")
    )

    log = TensorBoardLog(out, say) if ranks.is_main else None
    try:
        while state.epoch < config.epochs and not state.early_stopped(config.early_stop):
            timing = _train_epoch(run, train_stream, state, stop, log, progress)
            if timing is None:
                who = stop.name or "a signal on another rank"
                say(f"stopped by {who} at epoch {state.epoch + 1} step {state.step}, saved in"
                    f" {last_path}; run the same command with --resume to continue")  # fmt: skip
                return TrainResult(
                    out, out / "best.pt", last_path, state.history, state.best_epoch,
                    state.best_bleu4, False, ranks.rank, stop.name or "SIGTERM",
                )  # fmt: skip
            row = None
            if ranks.is_main:
                validation = validate(run, val_stream, references)
                row = epoch_row(state, timing, validation, ranks.world_size)
                figure = save_sample_attention(out, store, corpus, validation, state.epoch + 1)
                log.epoch(row, figure)
            row = ranks.broadcast(row)
            state.history.append(row)
            state.epoch, state.step = row["epoch"], 0
            state.loss_sum, state.nll_sum, state.tokens = 0.0, 0.0, 0
            improved = row["val_bleu4"] > state.best_bleu4
            if improved:
                state.best_bleu4, state.best_epoch = row["val_bleu4"], row["epoch"]
                state.epochs_without_improvement = 0
                save_run(run, out / "best.pt", state)
            else:
                state.epochs_without_improvement += 1
            save_run(run, last_path, state, resumable=True)
            if ranks.is_main:
                write_metrics(out, state.history)
                say(describe_epoch(row, improved, config.epochs))
                if warning := collapse_warning(row):
                    say(warning)
    finally:
        if log is not None:
            log.close()

    stopped_early = state.early_stopped(config.early_stop) and state.epoch < config.epochs
    if stopped_early:
        say(f"early stop: no better validation BLEU-4 for {config.early_stop} epochs")
    return TrainResult(
        out, out / "best.pt", last_path, state.history, state.best_epoch, state.best_bleu4,
        stopped_early, ranks.rank,
    )  # fmt: skip


def _train_epoch(
    run: Run,
    stream: FeatureStream,
    state: RunState,
    stop: StopRequest,
    log: TensorBoardLog | None,
    progress: bool,
) -> EpochTiming | None:
    """Train `state.epoch` from batch `state.step` on; updates `state` as it goes. None when a
    stop was requested (on any rank): then last.pt holds the step reached."""
    config, ranks = run.config, run.ranks
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
    try:
        while True:
            waiting = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - waiting
            data_wait += waited
            if batch is None:
                break
            output, grad_norm = _optimizer_step(run, batch.to(run.device))
            sums += torch.stack([output.loss.detach() * output.tokens, output.nll_sum.detach()])
            state.tokens += output.tokens
            state.step += 1
            captions += batch.num_captions
            bar.update(batch.num_captions)
            if progress and state.step % 25 == 0:
                bar.set_postfix(loss=f"{output.loss.item():.3f}")
            if log is not None:
                step_seconds = time.perf_counter() - waiting
                log.step(state.epoch * stream.num_batches + state.step, {
                    "loss": output.loss.item(),
                    "lr": run.optimizer.param_groups[0]["lr"],
                    **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                    "captions_per_s": batch.num_captions / step_seconds,
                    "data_wait": waited / step_seconds,
                })  # fmt: skip
            if ranks.any(stop.requested, run.device):  # all ranks stop at the same step
                own = [*(float(x) for x in sums.tolist()), state.tokens]
                state.loss_sum, state.nll_sum, state.tokens = own
                state.rank_sums = ranks.gather(own) if ranks.world_size > 1 else []
                save_run(run, Path(config.out) / "last.pt", state, resumable=True)
                return None
            now = time.perf_counter()
            if mid_epoch_saves and now - last_save >= config.checkpoint_minutes * 60:
                state.loss_sum, state.nll_sum = (float(x) for x in sums.tolist())
                save_run(run, Path(config.out) / "last.pt", state, resumable=True)
                last_save = time.perf_counter()
    finally:  # (also when a fault ends the epoch: the error then starts its own line)
        bar.close()
    state.loss_sum, state.nll_sum, state.tokens = ranks.sum(
        [*(float(x) for x in sums.tolist()), state.tokens]
    )
    return EpochTiming(time.perf_counter() - started, data_wait, int(ranks.sum([captions])[0]))


def _optimizer_step(run: Run, batch: Batch) -> tuple[LossOutput, torch.Tensor | None]:
    """Forward, backward, gradient clipping and the optimizer's update for one batch: the loss
    and the gradient norm before clipping (None without clipping)."""
    config, amp, optimizer = run.config, run.amp, run.optimizer
    with amp.autocast():
        output = run.model(batch.features, batch.image_index, batch.captions, batch.lengths)
    optimizer.zero_grad(set_to_none=True)
    amp.scaler.scale(output.loss).backward()
    grad_norm = None
    if config.grad_clip > 0:
        amp.scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(run.decoder.parameters(), config.grad_clip)
    amp.scaler.step(optimizer)
    amp.scaler.update()
    return output, grad_norm


# What each option accepts; the options not named here accept any value of their type.
_ACCEPTS = {
    "model": lambda name: name in DECODERS,
    "device": lambda name: name in DEVICES,
    "lr": lambda lr: lr > 0,
    **dict.fromkeys(
        ("epochs", "batch_size", "embed_size", "hidden_size", "attention_size", "min_count",
         "max_length"),
        lambda number: number >= 1,
    ),
    **dict.fromkeys(
        ("captions_per_image", "grad_clip", "alpha_c", "early_stop", "checkpoint_minutes"),
        lambda number: number >= 0,
    ),
    **dict.fromkeys(("dropout", "label_smoothing"), lambda fraction: 0 <= fraction < 1),
    "workers": lambda number: number is None or number >= 0,
}  # fmt: skip


def _check_options(config: TrainConfig) -> None:
    """Bad option values as one-line errors before any work starts."""
    for option in fields(config):
        value = getattr(config, option.name)
        if option.name in _ACCEPTS and not _ACCEPTS[option.name](value):
            raise CaptionerError(
                f"--{option.name.replace('_', '-')}: {value!r} is not a valid value"
            )


def seed_rank(seed: int, rank: int) -> None:
    """Give every rank its own random stream for dropout, after all ranks built the same weights
    from `seed`. Rank 0 goes on with the stream it has, so a single process trains as before."""
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def _silent(_: str) -> None:
    pass
