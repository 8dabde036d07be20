"""Show and Tell (Vinyals et al., 2015): the pooled image feature, projected to the embedding
size, is the LSTM's first input; the words follow. No attention.

For a caption S_0 = <start>, S_1, ..., S_N = <end> of an image whose pooled feature I (C,) is
standardized by the training split's statistics:

    x_-1  = W_I I + b_I                          the image embedding (E,)     `image_projection`
    x_t   = W_e S_t,  t = 0 .. N-1               the word embeddings (E,)     `embedding`
    the LSTM (`lstm`), from h_-2 = c_-2 = 0, its gates in PyTorch's order i, f, g, o:
    i_t   = sigmoid(W_ii x_t + W_hi h_t-1 + b_i)   input gate (H,)
    f_t   = sigmoid(W_if x_t + W_hf h_t-1 + b_f)   forget gate (H,)
    g_t   = tanh(W_ig x_t + W_hg h_t-1 + b_g)      candidate cell (H,)
    o_t   = sigmoid(W_io x_t + W_ho h_t-1 + b_o)   output gate (H,)
    c_t   = f_t * c_t-1 + i_t * g_t                                           `base.lstm_update`
    h_t   = o_t * tanh(c_t)
    p_t+1 = softmax(W_o dropout(h_t))             the next word's distribution (V,)  `head`

The image step (t = -1) is `init_state`, each word step `advance`; the loss is the label-smoothed
cross entropy of p_t+1 against S_t+1 over the real tokens (`base.label_smoothed_loss`).

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
        """Pooled features (B, C) -> the image embedding x_-1 (B, E), the LSTM's first input."""
        return (self.image_projection(self.standardize(features)),)

    def init_state(self, memory: Memory) -> State:
        """Run the LSTM over the image embedding from a zero state: state (h, c), each (B, H)."""
        (image_embedding,) = memory  # (B, E)
        return self._lstm_step(image_embedding)

    def advance(self, embedded: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, None]:
        h, c = self._lstm_step(embedded, state)  # (B, H) each
        return self.head(h), (h, c), None  # logits (B, V)

    def _lstm_step(self, inputs: Tensor, state: State | None = None) -> State:
        """One step of `self.lstm`, from a zero state where `state` is None. Written out because
        for one step nn.LSTM's own call costs up to 10x its products on a CPU (its oneDNN path
        prepares the weights at every call)."""
        lstm = self.lstm
        # the four gates' input products W_i* x + b: (B, 4H) from inputs (B, E)
        gates = F.linear(inputs, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
        if state is None:  # h = c = 0: no recurrent product
            return lstm_update(gates, gates.new_zeros(len(gates), lstm.hidden_size))
        h, c = state  # (B, H) each
        return lstm_update(torch.addmm(gates, h, lstm.weight_hh_l0.t()), c)  # + W_h h: (B, 4H)

    def real_tokens(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> RealTokens:
        """The batch packed (`pack_padded_sequence`, any order), so the LSTM and the head only
        ever see real tokens."""
        # h, c (B, H) after the image step, one row per caption
        state = self.init_state(select_rows(self.encode(features), image_index))
        steps = lengths.cpu() - 1  # (B,): the inputs drop <end>, the targets drop <start>

        def packed(padded: Tensor) -> PackedSequence:
            """(B, T - 1, ...) -> its N = steps.sum() real positions, step by step."""
            return pack_padded_sequence(padded, steps, batch_first=True, enforce_sorted=False)

        inputs = packed(self.embedding(captions[:, :-1]))  # data (N, E)
        rows, width = captions.size(0), captions.size(1) - 1
        device = captions.device
        return RealTokens(
            logits=self.head(self._packed_outputs(inputs, state)),  # (N, V)
            targets=packed(captions[:, 1:]).data,  # (N,)
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
        lstm, (h, c) = self.lstm, state  # (B, H) each
        # the gates' input products W_i* x + b of every real token at once: (N, 4H)
        gates = F.linear(inputs.data, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
        recurrent = LoopWeight(lstm.weight_hh_l0)  # W_h*: (4H, H)
        outputs = []
        for step_gates in gates.split(inputs.batch_sizes.tolist()):  # (b_t, 4H), b_t <= B
            running = len(step_gates)  # the captions still running are the first rows
            h, c = lstm_update(step_gates + recurrent(h[:running]), c[:running])  # (b_t, H)
            outputs.append(h)
        return torch.cat(outputs)  # (N, H)
