"""best.pt and last.pt: what they hold, writing them, resuming a run from last.pt, and starting a
self-critical run from a cross-entropy run's checkpoint (`initial_checkpoint`).

Both hold the decoder's weights with everything captioning needs (captioner.checkpoint). last.pt
adds what makes resume exact: the optimizer and loss-scaler state, every rank's RNG state, and
the RunState (where in which epoch the run stands, and its history). A resumed run must be the
same run, so the store, the vocabulary, the number of processes and every option outside
RESUMABLE_CHANGES must match the ones last.pt was written with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from captioner.checkpoint import (
    Checkpoint,
    load_checkpoint,
    non_finite_weights,
    require_finite_weights,
    save_checkpoint,
)
from captioner.errors import CaptionerError
from captioner.object_store import RemoteStore
from captioner.store import FeatureStore
from captioner.training.config import MODEL_DEFAULTS, TrainConfig, size_options
from captioner.training.divergence import TrainingDiverged
from captioner.training.run import Run

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
        "native_attention",  # the same function either way (tests/test_native_attention.py)
        "init",  # a resumed SCST run continues from last.pt and never reads --init again
    }
)


@dataclass
class RunState:
    """Where a run stands: what last.pt records besides the weights and the optimizer."""

    epoch: int = 0  # the epoch in progress, 0-based (equals the epochs done at an epoch end)
    step: int = 0  # batches of `epoch` already trained
    # The objective's running sums of `epoch` so far (captioner.training.objectives).
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    # Set only when every rank saved mid-epoch (preemption): each rank's totals.
    rank_totals: list = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    best_score: float = -1.0  # the best epoch's selection metric (TrainConfig.selection_metric)
    best_epoch: int = 0
    epochs_without_improvement: int = 0

    def early_stopped(self, patience: int) -> bool:
        return patience > 0 and self.epochs_without_improvement >= patience

    def finish_epoch(self, row: dict, selection_metric: str) -> bool:
        """Record the metrics row of the epoch just trained and start the next; whether its
        `selection_metric` is the best so far (best.pt is then due)."""
        self.history.append(row)
        self.epoch, self.step, self.totals = row["epoch"], 0, [0.0, 0.0, 0.0]
        improved = row[selection_metric] > self.best_score
        if improved:
            self.best_score, self.best_epoch = row[selection_metric], row["epoch"]
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return improved


def save_run(run: Run, path: Path, state: RunState, resumable: bool = False) -> None:
    """Write best.pt / last.pt from rank 0. A resumable (last.pt) checkpoint also holds the
    optimizer, the loss scaler and every rank's RNG state, so all ranks must call it.
    Weights that hold NaN or inf are never written: TrainingDiverged instead (on every rank, which
    all hold the same weights)."""
    if names := non_finite_weights(run.decoder.state_dict()):
        epoch, step = (state.epoch, None) if state.step == 0 else (state.epoch + 1, state.step)
        what = f"the weights to save in {path.name} are not finite (NaN or inf in {names[0]})"
        raise TrainingDiverged(run.config, epoch, step, what)
    rng_states = run.ranks.gather(_rng_state()) if resumable else []
    if not run.ranks.is_main:
        return
    checkpoint = Checkpoint(
        decoder_config=run.decoder.config,
        state_dict=run.decoder.state_dict(),
        vocabulary=run.vocabulary,
        encoder_config=run.store.encoder_config,
        store_fingerprint=run.store.fingerprint,
        weights_id=run.store.settings.weights_id,
        weights_checksum=run.store.settings.weights_checksum,
        corpus_sha256=run.corpus_sha256,
        training={
            "epoch": state.epoch,
            "step": state.step,
            "metrics": state.history[-1] if state.history else {},
            "options": _options(run.config),
            "precision": run.amp.precision.dtype,  # what "auto" (or the option) came to
        },
    )
    extra = None
    if resumable:
        extra = {
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.amp.scaler.state_dict(),
            "rng": rng_states,
            "world_size": run.ranks.world_size,
            "state": asdict(state),
        }
    save_checkpoint(path, checkpoint, extra)


def resume_run(run: Run, path: Path) -> RunState:
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
    # An option added after the run started ran with its default (for the model and objective).
    saved = {option.name: option.default for option in fields(config)}
    saved.update(MODEL_DEFAULTS[config.model].for_objective(config.objective))
    saved.update(checkpoint.training["options"])
    current = _options(config)
    changed = [
        f"--{name.replace('_', '-')} {saved[name]} -> {current[name]}"
        for name in current
        if name not in RESUMABLE_CHANGES and saved[name] != current[name]
    ]
    if changed:
        raise CaptionerError(
            f"{path}: resume with the options the run started with (pass them again where a"
            f" default has changed since); changed: {', '.join(changed)}"
        )
    if checkpoint.corpus_sha256 not in ("", run.corpus_sha256):
        raise CaptionerError(
            f"{config.captions or store.path}: the captions or splits differ from those of the run"
            " being resumed; resume with the ones it started with"
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
    state = _run_state(extra["state"])
    if state.rank_totals:  # a preempted multi-process run: each rank goes on from its own sums
        state.totals = state.rank_totals[ranks.rank]
        state.rank_totals = []
    return state


def stopped_before_its_first_save(out: Path) -> bool:
    """Whether the run folder `out` holds a run that stopped before it wrote last.pt (a full
    disk at its first checkpoint, say): no last.pt, and no trained epoch in its metrics.jsonl (an
    SCST run's row 0 is its starting weights). Resuming it means starting it again: the same run,
    which writes the same best.pt."""
    if not out.is_dir() or (out / "last.pt").exists():
        return False
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():  # (stopped at its very first write)
        return not (out / "best.pt").exists()
    try:
        rows = [json.loads(line) for line in metrics.read_text("utf-8").splitlines() if line]
    except (OSError, ValueError):
        return False
    return all(isinstance(row, dict) and row.get("epoch") == 0 for row in rows)


def _run_state(saved: dict) -> RunState:
    """The RunState last.pt holds, also from a last.pt written before the objective's totals
    replaced the cross-entropy sums (loss_sum, nll_sum, tokens) and best_bleu4."""
    saved = dict(saved)
    if "loss_sum" in saved:
        saved["totals"] = [saved.pop("loss_sum"), saved.pop("nll_sum"), saved.pop("tokens")]
        saved["rank_totals"] = saved.pop("rank_sums", [])  # (added later than the sums)
        saved["best_score"] = saved.pop("best_bleu4")
    return RunState(**saved)


def initial_checkpoint(
    config: TrainConfig, store: FeatureStore, corpus_sha256: str, path: Path
) -> tuple[TrainConfig, Checkpoint]:
    """The checkpoint a self-critical run starts from (`path`: `config.init`, or a resumed run's
    last.pt), and `config` with the sizes and vocabulary threshold of the decoder in it (and no
    dropout: SCST's samples and their log-probabilities must come from the same network).
    Refused in one line unless it was trained on this store, as this kind of decoder, on these
    captions."""
    checkpoint, _ = load_checkpoint(path)
    require_finite_weights(checkpoint, path)
    trained = checkpoint.decoder_config
    if checkpoint.store_fingerprint != store.fingerprint:
        raise CaptionerError(
            f"{path}: trained on another feature store ({checkpoint.store_fingerprint});"
            f" {store.path} is {store.fingerprint}"
        )
    if trained.model != config.model:
        raise CaptionerError(
            f"{path}: holds a {trained.model} decoder, not {config.model};"
            f" pass --model {trained.model}"
        )
    if checkpoint.corpus_sha256 not in ("", corpus_sha256):
        raise CaptionerError(
            f"{path}: trained on other captions or splits than"
            f" {config.captions or store.path}; pass the --captions it was trained with"
        )
    options = checkpoint.training.get("options", {})
    config = replace(
        config,
        **size_options(trained),
        dropout=0.0,
        min_count=options.get("min_count", config.min_count),
    )
    return config, checkpoint


def _options(config: TrainConfig) -> dict:
    """The config as plain values (paths and URLs as text: never a store's storage options,
    which may hold secrets), as checkpoints store it."""
    return {
        name: str(value) if isinstance(value, Path | RemoteStore) else value
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
