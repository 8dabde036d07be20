"""Show, Attend and Tell (Xu et al., 2015) with soft (Bahdanau) attention over the H*W regions.

For an image whose L = H*W regions f_1 .. f_L (C,) are standardized by the training split's
statistics, and a caption y_0 = <start>, y_1, ... whose words are embedded as E y (E,):

    h_0     = W_init_h mean_l(f_l) + b           the initial state (H,), from the mean feature:
    c_0     = W_init_c mean_l(f_l) + b             `init_state` (`init_h`, `init_c`)
    P_l     = W_f f_l + b_f                      each region's projection (A,), computed once
                                                   per image and shared by its captions (`encode`)
    and at each step t = 1, 2, ..., from the word y_t-1 and the state h_t-1, c_t-1:
    e_t,l   = w . tanh(P_l + W_h h_t-1) + b_w    additive (Bahdanau) attention scores (L,)
    alpha_t = softmax_l(e_t)                     where to look (L,)
    beta_t  = sigmoid(f_beta h_t-1)              the gate (C,)                         `gate`
    z_t     = beta_t * sum_l alpha_t,l f_l       the gated context (C,)
    the LSTM cell (`cell`) on x_t = [E y_t-1; z_t], its input, forget, candidate and output
    gates' pre-activations (H,) each, stacked in PyTorch's order:
    [i; f; g; o] = W_x x_t + W_hh h_t-1 + b      (4H,), W_x x_t = W_word E y_t-1 + W_context z_t
    c_t     = sigmoid(f) * c_t-1 + sigmoid(i) * tanh(g)                        `base.lstm_update`
    h_t     = sigmoid(o) * tanh(c_t)
    p_t     = softmax(W_o dropout(h_t))          the distribution of the word y_t (V,)  `head`

(W_f, W_h and w are `attention.feature_projection`, `.hidden_projection` and `.score`.) The loss
is the label-smoothed cross entropy of p_t against y_t over the real tokens, plus alpha_c times
the doubly stochastic penalty mean_l (1 - sum_t alpha_t,l)^2 (`attention_penalty`).

Training is fast because only what depends on the previous step runs inside the step loop
(bench/attention_step.py measures it against the layer-by-layer reference step, bench/RESULTS.md):
- the attention projection of the features, the largest matrix product, is computed once per
  image in `encode` and shared by all of the image's captions through `image_index`;
- masked full-length decoding: the whole batch runs to its longest caption and the loss is
  masked by length, so there is no sorting and no batch that shrinks step by step;
- the word half of the LSTM input is one matrix product for all steps before the loop, the
  three products of the hidden state (attention query, gate, recurrence) are one product per
  step, and the output layer and the loss run once after the loop, on the real tokens only;
- the attention scores keep one (captions, regions, attention) tensor per step for the backward
  pass instead of two (`additive_scores`).
The weights and their names are those of the plain layers (`nn.LSTMCell`, three `nn.Linear`), so
checkpoints are unchanged; tests/test_models.py checks the loss and every gradient against the
layer-by-layer reference (tests/plain_decoders.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from captioner.models.base import (
    CaptionDecoder,
    DecoderConfig,
    Memory,
    RealTokens,
    State,
    length_mask,
    lstm_update,
    rows_per_image,
    select_rows,
)
from captioner.models.native_attention import NativeScores
from captioner.models.step_weights import LoopWeight

# Values of tanh(projection + query) computed at once by `additive_scores`: a few images' rows,
# about 2 MB of float32, so that the add, the tanh and the backward's products stay in cache.
_SCORE_CHUNK_VALUES = 1 << 19


class _AdditiveScores(torch.autograd.Function):
    """``tanh(projection + query) @ weight + bias`` for k query rows per image, a few images at a
    time in one reused buffer, keeping nothing of size (images, k, L, A) for the backward pass:
    that computes the tanh again, chunk by chunk, where it is still in cache. The projection's
    gradient is summed over each image's k rows as it is made, so it stays the projection's size.
    """

    @staticmethod
    def forward(ctx, projection: Tensor, query: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(projection, query, weight)
        return _scores(projection, query, weight, bias)

    @staticmethod
    def backward(ctx, grad_scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        projection, query, weight = ctx.saved_tensors  # (G, L, A), (G, k, A), (A,)
        grad_projection = torch.empty_like(projection)  # (G, L, A)
        grad_query = torch.empty_like(query)  # (G, k, A)
        grad_weight, negative_weight = torch.zeros_like(weight), weight.neg()  # (A,) each
        for chunk, activation in _activations(projection, query):  # tanh(...) (g, k, L, A)
            grad = grad_scores[chunk]  # (g, k, L)
            # the weight's: activation (g k L, A) transposed times grad (g k L,)
            grad_weight.addmv_(activation.reshape(-1, activation.size(-1)).t(), grad.reshape(-1))
            # d tanh(x) / dx = 1 - tanh(x)^2; (tanh^2 - 1) * -weight, in place on the chunk:
            # the gradient of the sum P_l + W_h h, (g, k, L, A)
            activation.mul_(activation).sub_(1.0).mul_(negative_weight).mul_(grad.unsqueeze(-1))
            torch.sum(activation, 2, out=grad_query[chunk])  # over the regions: (g, k, A)
            torch.sum(activation, 1, out=grad_projection[chunk])  # over the k rows: (g, L, A)
        # the bias's gradient (1,): every score has it
        return grad_projection, grad_query, grad_weight, grad_scores.sum().reshape(1)


def _scores(projection: Tensor, query: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    scores = projection.new_empty(query.shape[:2] + projection.shape[1:2])  # (G, k, L)
    for chunk, activation in _activations(projection, query):  # (g, k, L, A)
        torch.matmul(activation, weight, out=scores[chunk])  # . w: (g, k, L)
    return scores.add_(bias)


def _activations(projection: Tensor, query: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """(images, tanh(projection + query) (g, k, L, A)) for chunks of g images, in one buffer."""
    images, rows = projection.size(0), query.size(1)  # G, k
    per_image = rows * projection[0].numel()  # k * L * A values
    # A GPU has no such cache to fit and pays per kernel launch: one chunk there.
    per_chunk = max(1, _SCORE_CHUNK_VALUES // per_image) if projection.is_cpu else images
    buffer = projection.new_empty(min(per_chunk, images) * per_image)
    for start in range(0, images, per_chunk):
        chunk = slice(start, start + per_chunk)
        size = len(range(*chunk.indices(images)))
        activation = buffer[: size * per_image].view(size, rows, *projection.shape[1:])
        # P (g, 1, L, A) + W_h h (g, k, 1, A) -> (g, k, L, A)
        torch.add(projection[chunk].unsqueeze(1), query[chunk].unsqueeze(2), out=activation)
        yield chunk, activation.tanh_()


class _NativeAdditiveScores(torch.autograd.Function):
    """`_AdditiveScores` computed by the compiled loops of additive_scores.c."""

    @staticmethod
    def forward(
        ctx, projection: Tensor, query: Tensor, weight: Tensor, bias: Tensor, native: NativeScores
    ) -> Tensor:
        ctx.save_for_backward(projection, query, weight)
        ctx.native = native
        return native.forward(projection, query, weight, bias)

    @staticmethod
    @once_differentiable  # the library's gradients are numbers, not a graph
    def backward(ctx, grad_scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        grads = ctx.native.backward(*ctx.saved_tensors, grad_scores)
        return *grads, grad_scores.sum().reshape(1), None


def additive_scores(
    projection: Tensor,
    query: Tensor,
    weight: Tensor,
    bias: Tensor,
    native: NativeScores | None = None,
) -> Tensor:
    """Scores (G, k, L) = tanh(projection (G, L, A) + query (G, k, A)) @ weight (A,) + bias (1,):
    the attention scores of k rows (captions or beams) of each of G images; computed by the
    `native` library where one is given and takes the tensors."""
    if native is not None and native.accepts(projection, query, weight):
        if not torch.is_grad_enabled():
            return native.forward(projection, query, weight, bias)
        return _NativeAdditiveScores.apply(projection, query, weight, bias, native)
    if projection.dtype != weight.dtype:  # autocast: the plain ops let it pick the dtypes
        activation = torch.tanh(projection.unsqueeze(1) + query.unsqueeze(2))  # (G, k, L, A)
        return activation @ weight.to(activation.dtype) + bias.to(activation.dtype)
    if not torch.is_grad_enabled():  # decoding: no graph to record
        return _scores(projection, query, weight, bias)
    return _AdditiveScores.apply(projection, query, weight, bias)


class Attention(nn.Module):
    """Additive attention: score_l = w . tanh(W_f f_l + W_h h) + b."""

    def __init__(self, feature_size: int, hidden_size: int, attention_size: int) -> None:
        super().__init__()
        self.feature_projection = nn.Linear(feature_size, attention_size)
        self.hidden_projection = nn.Linear(hidden_size, attention_size)
        self.score = nn.Linear(attention_size, 1)
        # The compiled scores (captioner.models.native_attention), where training loaded them.
        self.native: NativeScores | None = None

    def project(self, features: Tensor) -> Tensor:
        """(B, L, C) -> (B, L, A): the per-image part, computed once."""
        return self.feature_projection(features)

    def attend(self, features: Tensor, projection: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Context (R, C) and weights alpha (R, L) for the projected hidden states `query` (R, A)
        of R = G * k rows, k consecutive rows for each of the G images of `features` (G, L, C)
        and `projection` (G, L, A): the k captions (or beams) of an image share its features."""
        images = features.size(0)  # G
        scores = additive_scores(  # e: (G, k, L)
            projection,  # (G, L, A)
            query.view(images, -1, query.size(1)),  # (G, k, A)
            self.score.weight[0],  # w (A,)
            self.score.bias,  # (1,)
            self.native,
        )
        alpha = scores.softmax(-1)  # (G, k, L)
        context = torch.bmm(alpha, features)  # sum_l alpha_l f_l: (G, k, C)
        return context.flatten(0, 1), alpha.flatten(0, 1)  # (R, C), (R, L)


class _StepWeights(NamedTuple):
    """The step's matrices, grouped so that each input meets one product."""

    word: Tensor  # (4H, E): the word half of the LSTM input weight, used before the loop
    word_bias: Tensor  # (4H,)
    context: LoopWeight  # (4H, C): the gated-context half
    hidden: LoopWeight  # (A + C + 4H, H): attention query, gate and recurrence, stacked
    hidden_bias: Tensor  # (A + C + 4H,)


def attention_penalty(alphas: Tensor, mask: Tensor) -> Tensor:
    """The doubly stochastic penalty ``((1 - sum_t alpha_t)^2).mean()`` of alphas (B, S, L), the
    sum over the real steps in `mask` (B, S): each region should be looked at once in total."""
    attention_per_region = (alphas * mask.unsqueeze(2)).sum(1)
    return ((1.0 - attention_per_region) ** 2).mean()


class ShowAttendTell(CaptionDecoder):
    feature_kind = "spatial"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.attention = Attention(config.feature_size, config.hidden_size, config.attention_size)
        self.init_h = nn.Linear(config.feature_size, config.hidden_size)
        self.init_c = nn.Linear(config.feature_size, config.hidden_size)
        self.gate = nn.Linear(config.hidden_size, config.feature_size)  # f_beta in the paper
        self.cell = nn.LSTMCell(config.embed_size + config.feature_size, config.hidden_size)
        self._input_split = (config.embed_size, config.feature_size)
        self._hidden_split = (config.attention_size, config.feature_size, 4 * config.hidden_size)

    def encode(self, features: Tensor) -> Memory:
        """Spatial features (B, L, C) -> memory (features, attention projection (B, L, A))."""
        features = self.standardize(features)
        return features, self.attention.project(features)

    def init_state(self, memory: Memory) -> State:
        """h0, c0 (G, H) from the mean feature over the regions, one row per memory row."""
        mean = memory[0].mean(1)  # (G, C)
        return self.init_h(mean), self.init_c(mean)

    def advance(
        self, embedded: Tensor, state: State, memory: Memory
    ) -> tuple[Tensor, State, Tensor]:
        weights = self._step_weights()
        state, alpha = self._recur(  # the word's share of the gates (R, 4H) from embedded (R, E)
            F.linear(embedded, weights.word, weights.word_bias), state, memory, weights
        )
        return self.head(state[0]), state, alpha  # logits (R, V), alpha (R, L)

    def _recur(
        self, word_gates: Tensor, state: State, memory: Memory, weights: _StepWeights
    ) -> tuple[State, Tensor]:
        """One step from the word's share of the LSTM gates (R, 4H): the new state and alpha."""
        features, projection = memory  # f (G, L, C), P (G, L, A)
        h, c = state  # (R, H) each, k = R / G rows for each image
        hidden_products = weights.hidden(h)  # (R, A + C + 4H); autocast may make it half precision
        hidden_products = hidden_products + weights.hidden_bias.to(hidden_products.dtype)
        # W_h h (R, A), f_beta h (R, C), the LSTM's recurrent products W_h* h (R, 4H)
        query, gate, recurrence = hidden_products.split(self._hidden_split, 1)
        context, alpha = self.attention.attend(features, projection, query)  # (R, C), (R, L)
        gated = torch.sigmoid(gate) * context  # z = beta * context: (R, C)
        # the gates (R, 4H): word half + recurrent + context half; then h, c (R, H) each
        h, c = lstm_update(word_gates + recurrence + weights.context(gated), c)
        return (h, c), alpha

    def _step_weights(self) -> _StepWeights:
        cell, query, gate = self.cell, self.attention.hidden_projection, self.gate
        # split, not two slices: its backward writes the two gradients into one tensor, where
        # each slice's would fill a zero tensor of the whole weight's size
        word, context = cell.weight_ih.split(self._input_split, 1)
        return _StepWeights(
            word=word,
            word_bias=cell.bias_ih + cell.bias_hh,
            context=LoopWeight(context),
            hidden=LoopWeight(query.weight, gate.weight, cell.weight_hh),
            hidden_bias=torch.cat([query.bias, gate.bias, torch.zeros_like(cell.bias_hh)]),
        )

    def real_tokens(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> RealTokens:
        """Masked full-length decoding: every caption runs to the batch's longest, and the head
        runs once after the loop on the hidden states of the real tokens only."""
        memory = self.encode(features)  # f (G, L, C), P (G, L, A)
        rows = rows_per_image(image_index, features.size(0))  # k captions for each image
        if rows is None:  # images with unequal numbers of captions: one memory row per caption
            memory, rows = select_rows(memory, image_index), 1
        # h_0, c_0 (B, H) for the B = G * k captions
        state = tuple(s.repeat_interleave(rows, 0) for s in self.init_state(memory))
        steps = int(lengths.max()) - 1  # S: every caption runs to the longest
        weights = self._step_weights()
        # the word half of every step's gates, before the loop: (B, S, 4H)
        word_gates = F.linear(self.embedding(captions[:, :steps]), weights.word, weights.word_bias)
        hidden, alphas = [], []
        for step_gates in word_gates.unbind(1):  # (B, 4H)
            state, alpha = self._recur(step_gates, state, memory, weights)  # h, c (B, H); (B, L)
            hidden.append(state[0])
            alphas.append(alpha)
        mask = length_mask(lengths.to(captions.device) - 1, steps)  # (B, S): the real tokens
        caption_of, position = mask.nonzero().unbind(1)  # (N,) each, in the order of hidden[mask]
        return RealTokens(
            logits=self.head(torch.stack(hidden, 1)[mask]),  # (B, S, H)[mask] -> (N, V)
            targets=captions[:, 1 : steps + 1][mask],  # (N,)
            captions=caption_of,
            positions=position,
            penalty=lambda: attention_penalty(torch.stack(alphas, 1), mask),
        )
