"""What a training step minimizes: cross entropy on the reference captions, or self-critical
sequence training on sampled ones. Each is an `nn.Module` whose `forward` takes a batch and
returns the loss, which is what DistributedDataParallel synchronizes.

Each step also returns three running `totals` of the epoch (summed over ranks at its end), and
`epoch_means` turns them into the metrics row's training columns.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from captioner.models import CaptionDecoder
from captioner.models.decode import DecodingConfig, GeneratedCaption, greedy_decode, sample
from captioner.text import END_ID, START_ID
from captioner.training.batches import Batch, FeatureStream, padded
from captioner.training.metrics_log import perplexity
from captioner.training.reward import CiderReward


class StepOutput(NamedTuple):
    loss: Tensor  # what the step minimizes
    totals: Tensor  # (3,) float32 sums over the batch that `epoch_means` averages
    captions: int  # captions trained on: the references (xe) or the samples (scst)


class CrossEntropy(nn.Module):
    """Label-smoothed cross entropy of each reference caption's next words given the true prefix
    (teacher forcing), plus the attention model's doubly stochastic penalty.
    Totals: the loss and the unsmoothed negative log-likelihood summed over target tokens, and
    the tokens."""

    def __init__(self, decoder: CaptionDecoder, label_smoothing: float, alpha_c: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.label_smoothing, self.alpha_c = label_smoothing, alpha_c

    def forward(self, batch: Batch) -> StepOutput:
        output = self.decoder.training_loss(
            batch.features,
            batch.image_index,
            batch.captions,
            batch.lengths,
            self.label_smoothing,
            self.alpha_c,
        )
        totals = torch.stack(
            [
                output.loss.detach() * output.tokens,
                output.nll_sum.detach().float(),
                output.loss.new_tensor(float(output.tokens)),
            ]
        )
        return StepOutput(output.loss, totals.float(), batch.num_captions)

    @staticmethod
    def captions_to_train(stream: FeatureStream, epoch: int, start_batch: int) -> int:
        """What StepOutput.captions adds up to over the rest of the epoch: reference captions."""
        return stream.num_captions(epoch, start_batch)

    @staticmethod
    def epoch_means(totals: list[float]) -> dict:
        """Per target token: the objective and the unsmoothed NLL (the val loss's measure)."""
        loss_sum, nll_sum, tokens = totals
        nll = nll_sum / max(tokens, 1)
        return {
            "objective": loss_sum / max(tokens, 1),
            "train_loss": nll,
            "train_ppl": perplexity(nll),
        }


class SelfCritical(nn.Module):
    """Self-critical sequence training (Rennie et al., 2017): per image, sample `samples`
    captions, reward each with its CIDEr-D, and minimize ``-(reward - baseline) * log p(caption)``
    averaged over the samples, so captions better than the baseline become likelier.

    The baseline is the mean reward of the image's other samples ("mean", as the "new
    self-critical" of ruotianluo/self-critical.pytorch), or the reward of the image's greedy
    decode ("greedy", the paper's). The decoder runs without dropout, so the
    log-probabilities are those of the distribution the samples came from.
    Totals: the loss and the reward summed over samples, and the samples.
    """

    def __init__(
        self,
        decoder: CaptionDecoder,
        reward: CiderReward,
        samples: int,
        baseline: str,
        max_length: int,
    ) -> None:
        super().__init__()
        self.decoder, self.reward = decoder, reward
        self.samples, self.baseline, self.max_length = samples, baseline, max_length

    def forward(self, batch: Batch) -> StepOutput:
        features, k = batch.features, self.samples
        # Seeded from torch's generator, whose state last.pt keeps: a resumed run draws the same.
        seed = int(torch.randint(2**62, ()))
        drawn = sample(
            self.decoder,
            features,
            DecodingConfig("sample", max_length=self.max_length, seed=seed),
            k,
        )
        rows = np.repeat(batch.rows, k)
        rewards = self.reward(drawn, rows)
        advantage = torch.as_tensor(
            rewards - self._baselines(rewards, features, batch.rows),
            dtype=torch.float32,
            device=features.device,
        )
        captions, lengths = self._teacher_input(drawn, features.device)
        image_index = torch.arange(len(batch.rows), device=features.device).repeat_interleave(k)
        log_probs = self.decoder.caption_log_probs(features, image_index, captions, lengths)
        loss = -(advantage * log_probs).mean()
        totals = torch.stack(
            [
                loss.detach() * len(drawn),
                loss.new_tensor(float(rewards.sum())),
                loss.new_tensor(float(len(drawn))),
            ]
        )
        return StepOutput(loss, totals.float(), len(drawn))

    def captions_to_train(self, stream: FeatureStream, epoch: int, start_batch: int) -> int:
        """What StepOutput.captions adds up to over the rest of the epoch: the samples."""
        return stream.num_images(epoch, start_batch) * self.samples

    def _baselines(self, rewards: np.ndarray, features: Tensor, rows: np.ndarray) -> np.ndarray:
        """The baseline of each sample (samples of an image are consecutive)."""
        if self.baseline == "greedy":
            greedy = greedy_decode(self.decoder, features, self.max_length)
            return np.repeat(self.reward(greedy, rows), self.samples)
        per_image = rewards.reshape(-1, self.samples)
        others = (per_image.sum(1, keepdims=True) - per_image) / (self.samples - 1)
        return others.reshape(-1)

    def _teacher_input(
        self, captions: list[GeneratedCaption], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The captions as a padded batch ``<start> w1 .. wn [<end>]`` and their lengths: <end>
        only where the caption ended, so a cut-off caption is not credited with ending."""
        tokens, lengths = padded(
            [
                [START_ID, *caption.tokens] + ([END_ID] if caption.ended else [])
                for caption in captions
            ]
        )
        return torch.from_numpy(tokens).to(device), torch.from_numpy(lengths).to(device)

    @staticmethod
    def epoch_means(totals: list[float]) -> dict:
        """Per sample: the objective and the mean CIDEr-D reward."""
        loss_sum, reward_sum, samples = totals
        return {
            "objective": loss_sum / max(samples, 1),
            "mean_reward": reward_sum / max(samples, 1),
        }
