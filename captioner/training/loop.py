"""Phase 2: train a caption decoder from a feature store, in one loop a newcomer can read.

The store alone is enough: the vocabulary is built from the train split of the corpus stored in it
(or of `captions`, a caption file joined to the store's images by path). Each epoch trains on the
train split (training.batches streams it) with the run's objective (training.objectives: cross
entropy, or self-critical training that starts from a cross-entropy checkpoint), then measures
validation loss, BLEU-4 and CIDEr-D on greedy decodes of the val split. Everything goes to `out`:

    best.pt        the weights with the best validation score (BLEU-4; CIDEr-D for SCST):
                   captioning needs only this file
    last.pt        the same plus optimizer, loss-scaler and RNG state and the position in the epoch
    metrics.jsonl  one row per epoch (an SCST run's row 0 is its starting weights' validation)
    curves.png     loss, BLEU-4, CIDEr-D (and SCST's mean sample reward) per epoch
    vocab.json     the vocabulary;     attention/  per-word attention maps of a sample caption

Resume is exact. The batch order is a pure function of (seed, epoch, rank), so is each step's
learning rate of its number (training.schedule), and last.pt holds the RNG state of the step at
which it was written, so a run killed at any point (SIGKILL included) and resumed with the same
options ends with the same weights and metrics as an uninterrupted run on the same device.
last.pt is written at every epoch end and, in a single process, also mid-epoch every
`checkpoint_minutes`; every write is atomic. SIGTERM (a scheduler's notice) or Ctrl-C ends the
step in hand (on every rank: they agree on the step), writes last.pt there with each rank's
sums, and returns `preempted`.

A NaN or an infinity in a step's loss or gradient, in an epoch's metrics or in the weights about
to be saved stops the run at once in one line, writing nothing from those weights
(training.divergence).

Launched by torchrun (WORLD_SIZE > 1) the objective is wrapped in DistributedDataParallel (NCCL
on CUDA, gloo on CPU); each rank reads its own part of the store, and rank 0 validates and writes.

This module is the loop; the parts it uses live beside it in captioner/training/ (config, data,
batches, objectives, reward, run, resume, divergence, validation, metrics_log, tensorboard), one
concern a module.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner.cider import CiderD
from captioner.corpus import Corpus
from captioner.devices import resolve_device
from captioner.distributed import Ranks, process_group
from captioner.errors import CaptionerError
from captioner.files import require_writable_folder
from captioner.models import build_decoder, load_native_attention
from captioner.preemption import StopRequest
from captioner.progress import ShowProgress, write
from captioner.progress import bar as progress_bar
from captioner.store import FeatureStore, corpus_digest, split_rows, training_corpus
from captioner.text import Vocabulary
from captioner.training.batches import Batch, FeatureStream
from captioner.training.config import (
    METRIC_NAMES,
    TrainConfig,
    TrainResult,
    checked_config,
    decoder_config,
)
from captioner.training.data import (
    check_preload_device,
    describe_reading,
    feature_statistics,
    feature_stream,
    reader_threads,
    training_reading,
    validation_reading,
)
from captioner.training.divergence import TrainingDiverged, non_finite_columns
from captioner.training.metrics_log import (
    EpochTiming,
    describe_epoch,
    epoch_row,
    start_row,
    write_metrics,
)
from captioner.training.objectives import CrossEntropy, SelfCritical, StepOutput
from captioner.training.resume import (
    RunState,
    initial_checkpoint,
    resume_run,
    save_run,
    stopped_before_its_first_save,
)
from captioner.training.reward import CiderReward
from captioner.training.run import Run
from captioner.training.tensorboard import TensorBoardLog
from captioner.training.validation import (
    collapse_warning,
    reference_words,
    save_sample_attention,
    validate,
)


def train(config: TrainConfig, progress: ShowProgress = False) -> TrainResult:
    """Train (or resume) the run `config` describes; see the module docstring."""
    config = checked_config(config)
    ranks = Ranks.from_environment()
    device = resolve_device(config.device, ranks.local_rank)
    check_preload_device(config.preload, device)
    with process_group(ranks, device), StopRequest() as stop:
        return _train(config, ranks, device, stop, progress)


def _train(
    config: TrainConfig,
    ranks: Ranks,
    device: torch.device,
    stop: StopRequest,
    progress: ShowProgress,
) -> TrainResult:
    progress = progress if ranks.is_main else False  # (only rank 0 shows anything)
    say = write if progress else _silent
    out, last_path = Path(config.out), Path(config.out) / "last.pt"
    if ranks.is_main:
        require_writable_folder(out)
    store = FeatureStore.open(config.features)
    corpus = training_corpus(store, config.captions, progress)
    train_rows, val_rows = (split_rows(corpus, store, split) for split in ("train", "val"))
    for split, rows in (("train", train_rows), ("val", val_rows)):
        if len(rows) == 0:
            raise CaptionerError(f"{store.path}: no {split} images with features and captions")
    if config.resume and stopped_before_its_first_save(out):
        say(f"no {last_path} yet (the run stopped before its first save): it starts again")
        config = replace(config, resume=False)
    run = _start_run(config, ranks, device, store, corpus, train_rows, progress)
    config, vocabulary = run.config, run.vocabulary
    state = RunState()
    if config.resume:
        state = resume_run(run, last_path)
    elif last_path.exists():
        raise CaptionerError(
            f"{out}: already holds a run; pass --resume to continue it or choose another --out"
        )

    kind = run.decoder.feature_kind
    train_stream = feature_stream(
        store,
        corpus,
        vocabulary,
        train_rows,
        config.max_length,
        training_reading(config, kind, device, ranks),
    )
    if ranks.is_main:  # only rank 0 validates and writes
        val_stream = feature_stream(
            store,
            corpus,
            vocabulary,
            val_rows,
            config.max_length,
            validation_reading(config, kind, device),
        )
        references = reference_words(corpus, val_rows)
        val_cider = CiderD(references, progress)  # (coco-caption's CIDEr-D of the val split)
        out.mkdir(parents=True, exist_ok=True)
        vocabulary.save(out / "vocab.json")
        write_metrics(out, state.history)
    say(
        f"training {config.model} ({config.objective}) on {store.path} ({len(train_rows)} train,"
        f" {len(val_rows)} val images, vocabulary {len(vocabulary)}) on {device}"
        + (f" x {ranks.world_size} ranks" if ranks.world_size > 1 else "")
    )
    say(run.amp.precision.describe())
    say(describe_reading(train_stream, reader_threads(config.workers, device)[1]))
    if config.resume:
        say(_where_resumed(state, train_stream.num_batches, config.epochs, last_path))
    if config.native_attention and (
        note := load_native_attention(run.decoder, store.grid[0] * store.grid[1], device)
    ):
        say(note)
    if config.objective == "scst":
        say(
            f"self-critical training from {config.init}: its vocabulary and sizes, no dropout;"
            f" {config.scst_samples} samples per image, {config.scst_baseline} baseline, lr"
            f" {config.lr:g} (--label-smoothing and --alpha-c apply to cross entropy only)"
        )

    log = TensorBoardLog(out, say) if ranks.is_main else None

    def end_epoch(timing: EpochTiming | None) -> None:
        """Validate the weights at hand and record them as the next metrics row (row 0, the
        starting weights, when `timing` is None); write best.pt if they are the best so far, and
        last.pt after a trained epoch."""
        row = None
        if ranks.is_main:
            validation = validate(
                run.decoder,
                val_stream,
                references,
                val_cider,
                vocabulary,
                config.max_length,
                run.amp,
                progress,
            )
            if timing is None:
                row, figure = start_row(validation), None
            else:
                means = run.objective.epoch_means(state.totals)
                lr = run.schedule.rate((state.epoch + 1) * train_stream.num_batches)
                row = epoch_row(state, timing, validation, ranks.world_size, means, lr)
                figure = save_sample_attention(out, store, corpus, validation, state.epoch + 1)
            log.epoch(row, figure)
        row = ranks.broadcast(row)
        if not_finite := non_finite_columns(row):
            values = ", ".join(f"{name} {row[name]}" for name in not_finite)
            what = f"its metrics are not finite ({values})"
            raise TrainingDiverged(config, row["epoch"], None, what, epoch_row=row)
        improved = state.finish_epoch(row, config.selection_metric)
        if improved:
            save_run(run, out / "best.pt", state)
        if timing is not None:
            save_run(run, last_path, state, resumable=True)
        if ranks.is_main:
            write_metrics(out, state.history)
            say(describe_epoch(row, improved, config.epochs))
            if warning := collapse_warning(row):
                say(warning)

    try:
        if config.objective == "scst" and not state.history:
            end_epoch(None)  # best.pt holds the starting weights until an epoch beats them
        while state.epoch < config.epochs and not state.early_stopped(config.early_stop):
            timing = _train_epoch(run, train_stream, state, stop, log, progress)
            if timing is None:
                who = stop.name or "a signal on another rank"
                say(
                    f"stopped by {who} at epoch {state.epoch + 1} step {state.step}, saved in"
                    f" {last_path}; run the same command with --resume to continue"
                )
                return _result(run, state, stopped_early=False, preempted=stop.name or "SIGTERM")
            end_epoch(timing)
    except TrainingDiverged as diverged:
        if ranks.is_main:  # the run records how it ended; last.pt and best.pt stay as they were
            write_metrics(out, [*state.history, *diverged.rows])
        raise
    finally:
        if log is not None:
            log.close()

    stopped_early = state.early_stopped(config.early_stop) and state.epoch < config.epochs
    if stopped_early:
        name = METRIC_NAMES[config.selection_metric]
        say(f"early stop: no better validation {name} for {config.early_stop} epochs")
    return _result(run, state, stopped_early)


def _start_run(
    config: TrainConfig,
    ranks: Ranks,
    device: torch.device,
    store: FeatureStore,
    corpus: Corpus,
    train_rows: np.ndarray,
    progress: ShowProgress,
) -> Run:
    """The decoder a run starts with and the objective that trains it: a new decoder with the
    train split's vocabulary and feature statistics for cross entropy, the `init` checkpoint's
    decoder for self-critical training."""
    digest = corpus_digest(corpus)
    torch.manual_seed(config.seed)
    if config.objective == "scst":
        last = Path(config.out) / "last.pt"
        source = last if config.resume and last.is_file() else config.init
        config, start = initial_checkpoint(config, store, digest, source)
        vocabulary = start.vocabulary
    else:
        vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), config.min_count, progress)
    decoder = build_decoder(decoder_config(config, len(vocabulary), store.channels, store.grid))
    if config.objective == "scst":
        decoder.load_state_dict(start.state_dict)
        reward = CiderReward(corpus, train_rows.tolist(), vocabulary, progress)
        objective: nn.Module = SelfCritical(
            decoder, reward, config.scst_samples, config.scst_baseline, config.max_length
        )
    else:
        if not config.resume:  # a resumed run takes its statistics from the checkpoint
            statistics = feature_statistics(store, train_rows, decoder.feature_kind, progress)
            decoder.set_feature_statistics(*statistics)
        objective = CrossEntropy(decoder, config.label_smoothing, config.alpha_c)
    objective = objective.to(device)
    seed_rank(config.seed, ranks.rank)
    return Run(config, ranks, device, store, vocabulary, decoder, objective, digest)


def _train_epoch(
    run: Run,
    stream: FeatureStream,
    state: RunState,
    stop: StopRequest,
    log: TensorBoardLog | None,
    progress: ShowProgress,
) -> EpochTiming | None:
    """Train `state.epoch` from batch `state.step` on; updates `state` as it goes. None when a
    stop was requested (on any rank): then last.pt holds the step reached."""
    config, ranks = run.config, run.ranks
    run.model.train()
    totals = torch.tensor(state.totals, dtype=torch.float32, device=run.device)
    bar = progress_bar(
        progress,
        f"epoch {state.epoch + 1}/{config.epochs}",
        run.objective.captions_to_train(stream, state.epoch, state.step),
        unit="cap",
        leave=False,
        unit_scale=True,
    )
    mid_epoch_saves = ranks.world_size == 1  # ranks would have to agree on when to stop and save
    last_save = time.perf_counter()
    # Speed and data wait are measured over the steps this call runs: from the first wait for a
    # batch to the end of the last step (a resumed epoch runs only its remaining steps).
    first_wait, last_step_end, data_wait, captions = None, None, 0.0, 0
    batches = stream.epoch(state.epoch, start_batch=state.step)
    try:
        while True:
            waiting = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            waited = time.perf_counter() - waiting
            first_wait = waiting if first_wait is None else first_wait
            data_wait += waited
            run.schedule.set(run.optimizer, state.epoch * stream.num_batches + state.step + 1)
            output, grad_norm, finite = _optimizer_step(run, batch.to(run.device))
            if not finite:  # (on every rank: _optimizer_step's verdict is theirs together)
                what = "the loss or its gradient is NaN or inf"
                raise TrainingDiverged(config, state.epoch + 1, state.step + 1, what)
            totals += output.totals
            state.step += 1
            captions += output.captions
            last_step_end = time.perf_counter()
            bar.update(output.captions)
            if progress and state.step % 25 == 0:
                bar.set_postfix(loss=f"{output.loss.item():.3f}")
            if log is not None:
                step_seconds = time.perf_counter() - waiting
                log.step(
                    state.epoch * stream.num_batches + state.step,
                    {
                        "loss": output.loss.item(),
                        "lr": run.optimizer.param_groups[0]["lr"],
                        "grad_norm": float(grad_norm),
                        "captions_per_s": output.captions / step_seconds,
                        "data_wait": waited / step_seconds,
                    },
                )
            if ranks.any(stop.requested, run.device):  # all ranks stop at the same step
                state.totals = totals.tolist()
                state.rank_totals = ranks.gather(state.totals) if ranks.world_size > 1 else []
                save_run(run, Path(config.out) / "last.pt", state, resumable=True)
                return None
            now = time.perf_counter()
            if mid_epoch_saves and now - last_save >= config.checkpoint_minutes * 60:
                state.totals = totals.tolist()
                save_run(run, Path(config.out) / "last.pt", state, resumable=True)
                last_save = time.perf_counter()
    finally:  # (also when a fault ends the epoch: the error then starts its own line)
        bar.close()
    state.totals = ranks.sum(totals.tolist())
    seconds = last_step_end - first_wait if first_wait is not None else 0.0
    return EpochTiming(seconds, data_wait, int(ranks.sum([captions])[0]))


def _optimizer_step(run: Run, batch: Batch) -> tuple[StepOutput, torch.Tensor, bool]:
    """Forward, backward, gradient clipping and the optimizer's update for one batch: the
    objective's output, the gradient norm before clipping, and whether the step was finite.

    The update is taken only if the loss and the gradient norm are finite on every rank (where a
    float16 loss scaler runs, it skips steps with inf gradients itself, and only the loss is
    checked); otherwise the weights stay those of the last good step."""
    config, amp, optimizer = run.config, run.amp, run.optimizer
    with amp.autocast():
        output = run.model(batch)
    optimizer.zero_grad(set_to_none=True)
    amp.scaler.scale(output.loss).backward()
    amp.scaler.unscale_(optimizer)
    parameters = [p for p in run.decoder.parameters() if p.grad is not None]
    if config.grad_clip > 0:
        grad_norm = nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in parameters])
    checked = [output.loss.detach().float()]
    if not amp.scaler.is_enabled():
        checked.append(grad_norm.float())
    finite = bool(torch.isfinite(torch.stack(checked)).all())
    if run.ranks.any(not finite, run.device):
        return output, grad_norm, False
    amp.scaler.step(optimizer)
    amp.scaler.update()
    return output, grad_norm, True


def _where_resumed(state: RunState, steps: int, epochs: int, last_path: Path) -> str:
    """The line a resumed run starts with: where in which epoch it goes on, from which file."""
    if state.epoch >= epochs:
        return f"{last_path}: the run has trained its {epochs} epochs (a larger --epochs goes on)"
    return f"resuming at epoch {state.epoch + 1}, step {state.step} of {steps} from {last_path}"


def _result(run: Run, state: RunState, stopped_early: bool, preempted: str = "") -> TrainResult:
    out = Path(run.config.out)
    return TrainResult(
        out,
        out / "best.pt",
        out / "last.pt",
        state.history,
        state.best_epoch,
        state.best_score,
        run.config.selection_metric,
        stopped_early,
        run.ranks.rank,
        preempted,
    )


def seed_rank(seed: int, rank: int) -> None:
    """Give every rank its own random stream for dropout, after all ranks built the same weights
    from `seed`. Rank 0 goes on with the stream it has, so a single process trains as before."""
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def _silent(_: str) -> None:
    pass
