"""The decoder under training and what each optimizer step needs with it: the objective, the
optimizer, mixed precision, and (under torchrun) the DistributedDataParallel wrapper."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captioner.distributed import Ranks
from captioner.models import CaptionDecoder
from captioner.precision import Precision, resolve_precision
from captioner.store import FeatureStore
from captioner.text import Vocabulary
from captioner.training.config import TrainConfig
from captioner.training.schedule import LearningRateSchedule


class Run:
    """What every step of a run uses: its config and process, the decoder, the objective that
    trains it, its optimizer and learning-rate schedule, and the store, vocabulary and corpus
    digest that every checkpoint records."""

    def __init__(
        self,
        config: TrainConfig,
        ranks: Ranks,
        device: torch.device,
        store: FeatureStore,
        vocabulary: Vocabulary,
        decoder: CaptionDecoder,
        objective: nn.Module,
        corpus_sha256: str,
    ) -> None:
        self.config, self.ranks, self.device = config, ranks, device
        self.store, self.vocabulary, self.decoder = store, vocabulary, decoder
        self.objective = objective  # captioner.training.objectives: its forward is the step's loss
        self.corpus_sha256 = corpus_sha256  # of the corpus and splits trained on
        # One fused kernel for the whole update where PyTorch has it, instead of a dozen passes.
        fused = device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr, fused=fused)
        self.schedule = LearningRateSchedule(config.lr, config.warmup_steps)  # each step's rate
        self.amp = Amp(resolve_precision(config.precision, device, decoder.config.model))
        self.model: nn.Module = objective
        if ranks.world_size > 1:
            self.model = DistributedDataParallel(
                objective, device_ids=[device.index] if device.type == "cuda" else None
            )


class Amp:
    """Mixed precision as `precision` says (captioner.precision): bfloat16 autocast (no loss
    scaling needed), float16 autocast with a gradient scaler (a CUDA GPU without bf16), or
    neither in float32."""

    def __init__(self, precision: Precision) -> None:
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision.dtype == "float16")

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast()
