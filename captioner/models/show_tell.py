"""Show and Tell (Vinyals et al., 2015): the pooled image feature, projected to the embedding
size, is the LSTM's first input; the words follow. No attention.

Training packs the batch (`pack_padded_sequence`, any order) so the LSTM and the loss only ever
see real tokens. The image step is run on its own first, which is exactly `init_state` of the step
API, so decoding and training share every line that matters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from captioner.models.base import (
    CaptionDecoder,
    DecoderConfig,
    Memory,
    RealTokens,
    State,
    select_rows,
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

    def real_tokens(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> RealTokens:
        """The batch packed (`pack_padded_sequence`, any order), so the LSTM and the head only
        ever see real tokens; `nn.LSTM` permutes the initial state into the packed order."""
        h, c = self.init_state(select_rows(self.encode(features), image_index))
        steps = lengths.cpu() - 1  # the inputs drop <end>, the targets drop <start>

        def packed(padded: Tensor) -> PackedSequence:
            return pack_padded_sequence(padded, steps, batch_first=True, enforce_sorted=False)

        outputs, _ = self.lstm(packed(self.embedding(captions[:, :-1])), (h[None], c[None]))
        rows, width = captions.size(0), captions.size(1) - 1
        device = captions.device
        return RealTokens(
            logits=self.head(outputs.data),
            targets=packed(captions[:, 1:]).data,
            captions=packed(torch.arange(rows, device=device)[:, None].expand(-1, width)).data,
            positions=packed(torch.arange(width, device=device).expand(rows, -1)).data,
            penalty=None,
        )
