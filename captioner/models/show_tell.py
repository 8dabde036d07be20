"""Show and Tell (Vinyals et al., 2015): the pooled image feature, projected to the embedding
size, is the LSTM's first input; the words follow. No attention.

Training packs the batch (`pack_padded_sequence`, any order) so the LSTM and the loss only ever
see real tokens. The image step is run on its own first, which is exactly `init_state` of the step
API, so decoding and training share every line that matters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from captioner.models.base import (
    CaptionDecoder,
    DecoderConfig,
    LossOutput,
    Memory,
    State,
    label_smoothed_loss,
    select_rows,
    summed_log_probs,
)


class ShowTell(CaptionDecoder):
    feature_kind = "pooled"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.image_projection = nn.Linear(config.feature_size, config.embed_size)
        self.lstm = nn.LSTM(config.embed_size, config.hidden_size, batch_first=True)

    def encode(self, features: Tensor) -> Memory:
        """Pooled features (B, C) -> the image embedding (B, E), the LSTM's first input."""
        return (self.image_projection(self.standardize(features)),)

    def init_state(self, memory: Memory) -> State:
        """Run the LSTM over the image embedding from a zero state: state (h, c), each (B, H)."""
        (image_embedding,) = memory
        _, (h, c) = self.lstm(image_embedding.unsqueeze(1))
        return h.squeeze(0), c.squeeze(0)

    def advance(self, embedded: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, None]:
        h, c = state
        output, (h, c) = self.lstm(embedded.unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0)))
        return self.head(output.squeeze(1)), (h.squeeze(0), c.squeeze(0)), None

    def _packed_logits(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> tuple[PackedSequence, PackedSequence]:
        """Logits and targets as PackedSequences in the same (packed) order."""
        h, c = self.init_state(select_rows(self.encode(features), image_index))
        steps = lengths.cpu() - 1  # the inputs drop <end>, the targets drop <start>
        inputs = pack_padded_sequence(
            self.embedding(captions[:, :-1]), steps, batch_first=True, enforce_sorted=False
        )
        # nn.LSTM permutes a given initial state into the packed (sorted) order itself.
        outputs, _ = self.lstm(inputs, (h.unsqueeze(0), c.unsqueeze(0)))
        targets = pack_padded_sequence(
            captions[:, 1:], steps, batch_first=True, enforce_sorted=False
        )
        return outputs._replace(data=self.head(outputs.data)), targets

    def training_loss(
        self,
        features: Tensor,
        image_index: Tensor,
        captions: Tensor,
        lengths: Tensor,
        label_smoothing: float = 0.0,
        alpha_c: float = 0.0,
    ) -> LossOutput:
        """Loss on the packed targets: only real tokens are ever computed. `alpha_c` is unused
        (no attention) and accepted so both decoders are trained the same way."""
        logits, targets = self._packed_logits(features, image_index, captions, lengths)
        return label_smoothed_loss(logits.data, targets.data, label_smoothing)

    def caption_log_probs(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> Tensor:
        logits, targets = self._packed_logits(features, image_index, captions, lengths)
        caption_of_position = torch.arange(len(captions), device=captions.device)[:, None]
        rows = pack_padded_sequence(
            caption_of_position.expand(-1, captions.size(1) - 1),
            lengths.cpu() - 1,
            batch_first=True,
            enforce_sorted=False,
        )
        return summed_log_probs(logits.data, targets.data, rows.data, len(captions))

    def teacher_forced_log_probs(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> Tensor:
        logits, _ = self._packed_logits(features, image_index, captions, lengths)
        padded, _ = pad_packed_sequence(logits, batch_first=True)
        return padded.float().log_softmax(-1)
