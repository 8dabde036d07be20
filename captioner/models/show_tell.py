"""Show and Tell (Vinyals et al., 2015): the pooled image feature, projected to the embedding
size, is the LSTM's first input; the words follow. No attention.

Training packs the batch (`pack_padded_sequence`, any order) so the LSTM and the loss only ever
see real tokens. The image step is run on its own first, which is exactly `init_state` of the step
API, so decoding and training share every line that matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from captioner.models.base import (
    CaptionDecoder,
    DecoderConfig,
    Memory,
    RealTokens,
    State,
    lstm_update,
    select_rows,
)
from captioner.models.step_weights import LoopWeight


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
        return self._lstm_step(image_embedding)

    def advance(self, embedded: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, None]:
        h, c = self._lstm_step(embedded, state)
        return self.head(h), (h, c), None

    def _lstm_step(self, inputs: Tensor, state: State | None = None) -> State:
        """One step of `self.lstm`, from a zero state where `state` is None. Written out because
        for one step nn.LSTM's own call costs up to 10x its products on a CPU (its oneDNN path
        prepares the weights at every call)."""
        lstm = self.lstm
        gates = F.linear(inputs, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
        if state is None:
            return lstm_update(gates, gates.new_zeros(len(gates), lstm.hidden_size))
        h, c = state
        return lstm_update(torch.addmm(gates, h, lstm.weight_hh_l0.t()), c)

    def real_tokens(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> RealTokens:
        """The batch packed (`pack_padded_sequence`, any order), so the LSTM and the head only
        ever see real tokens."""
        state = self.init_state(select_rows(self.encode(features), image_index))
        steps = lengths.cpu() - 1  # the inputs drop <end>, the targets drop <start>

        def packed(padded: Tensor) -> PackedSequence:
            return pack_padded_sequence(padded, steps, batch_first=True, enforce_sorted=False)

        inputs = packed(self.embedding(captions[:, :-1]))
        rows, width = captions.size(0), captions.size(1) - 1
        device = captions.device
        return RealTokens(
            logits=self.head(self._packed_outputs(inputs, state)),
            targets=packed(captions[:, 1:]).data,
            captions=packed(torch.arange(rows, device=device)[:, None].expand(-1, width)).data,
            positions=packed(torch.arange(width, device=device).expand(rows, -1)).data,
            penalty=None,
        )

    def _packed_outputs(self, inputs: PackedSequence, state: State) -> Tensor:
        """The LSTM's outputs (N, H) at the packed positions of `inputs` from `state` (rows in
        the batch's order). On a GPU one cuDNN call runs the whole packed batch, where the loop
        written out would launch a dozen kernels a step (tests/plain_decoders.PlainShowTell runs
        the same call on a CPU, and the tests compare the two)."""
        if inputs.data.is_cuda:
            return self.lstm(inputs, (state[0][None], state[1][None]))[0].data
        return self._packed_lstm(inputs, select_rows(state, inputs.sorted_indices))

    def _packed_lstm(self, inputs: PackedSequence, state: State) -> Tensor:
        """`_packed_outputs` from `state` in the packed order, the way nn.LSTM runs a packed
        batch (step t is the first batch_sizes[t] rows of the length-sorted order), written out
        so that the input products are one product before the loop and the recurrent weight's
        gradient one product after it (`LoopWeight`), instead of one small product per step each
        way; on a CPU that is 1.2x faster."""
        lstm, (h, c) = self.lstm, state
        gates = F.linear(inputs.data, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
        recurrent = LoopWeight(lstm.weight_hh_l0)
        outputs = []
        for step_gates in gates.split(inputs.batch_sizes.tolist()):
            running = len(step_gates)  # the captions still running are the first rows
            h, c = lstm_update(step_gates + recurrent(h[:running]), c[:running])
            outputs.append(h)
        return torch.cat(outputs)
