"""What every caption decoder shares: its configuration, the word embedding, the output head,
the label-smoothed loss over real tokens, and the step API that all decoding goes through.

The two decoders differ only in how they turn image features into an LSTM state and a per-step
input; everything around that lives here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from captioner.text import NEVER_GENERATED, PAD_ID

Memory = tuple[Tensor, ...]  # per-image tensors computed once by `encode`; batch is dim 0
# Recurrent state, batch in dim 0: k consecutive rows (captions or beams) for each memory row,
# k = rows // memory rows, so that the rows of one image share its memory without copies.
State = tuple[Tensor, ...]


@dataclass
class DecoderConfig:
    """Sizes of a decoder. `feature_size` is the encoder's channel count C.

    The transformer's width d_model is `hidden_size`, and `embed_size` must equal it (its word
    embeddings are the residual stream's first values); it has no use for `attention_size`. The
    fields after `dropout` are the transformer's alone; their defaults let configs saved before
    they existed load.
    """

    model: str  # "show-tell" | "show-attend-tell" | "transformer"
    vocab_size: int
    feature_size: int
    embed_size: int = 512
    hidden_size: int = 512
    attention_size: int = 512
    dropout: float = 0.5
    decoder_layers: int = 3
    heads: int = 8  # attention heads; hidden_size / heads per head
    ff_size: int = 2048  # inner size of each layer's feed-forward block
    encoder_layers: int = 0  # self-attention layers over the regions before the decoder reads them
    max_positions: int = 64  # word positions with an embedding: <start> and up to 63 words
    max_grid_side: int = 32  # grid rows (and columns) with an embedding: up to 32 x 32 regions

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DecoderConfig:
        """The inverse of `to_dict`; unknown keys are an error (ValueError), never ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown decoder config keys: {sorted(unknown)}")
        return cls(**data)


class RealTokens(NamedTuple):
    """The real target tokens of a teacher-forced batch (every word after <start>, and <end>
    where the caption has one), in whatever order the decoder computes them."""

    logits: Tensor  # (N, V) of each token's prediction
    targets: Tensor  # (N,) the token
    captions: Tensor  # (N,) the caption (row of the batch) it belongs to
    positions: Tensor  # (N,) its step: 0 predicts the first word
    # The attention model's `attention_penalty`, computed only when asked for; None without
    # attention.
    penalty: Callable[[], Tensor] | None


class LossOutput(NamedTuple):
    loss: Tensor  # to minimise: label-smoothed mean over real target tokens (+ attention penalty)
    tokens: int  # number of real target tokens in the batch
    nll_sum: Tensor  # summed unsmoothed negative log-likelihood, for perplexity


def label_smoothed_loss(logits: Tensor, targets: Tensor, label_smoothing: float) -> LossOutput:
    """Cross entropy with label smoothing, the mean over the tokens of `logits` (N, V) and
    `targets` (N,): ``F.cross_entropy(logits, targets, label_smoothing=ε)``, with the
    unsmoothed NLL from the same log-softmax for free."""
    smoothed, nll = _SmoothedCrossEntropy.apply(logits, targets, label_smoothing)
    return LossOutput(smoothed.sum() / max(len(targets), 1), len(targets), nll.sum())


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Each token's label-smoothed cross entropy and NLL. The backward writes the gradient,
    ``softmax - (1 - ε) onehot - ε / V`` times the token's gradient, in three passes over the
    (N, V) logits, where autograd through log_softmax, gather and mean makes six (14 of a 120 ms
    Show-and-Tell step at batch 80)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
        log_probs = logits.float().log_softmax(-1)  # (N, V)
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
        smoothed = (1.0 - smoothing) * nll - smoothing * log_probs.mean(-1)  # (N,)
        ctx.save_for_backward(log_probs, targets)
        ctx.smoothing, ctx.dtype = smoothing, logits.dtype
        ctx.mark_non_differentiable(nll)
        return smoothed, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_smoothed: Tensor, _grad_nll: None) -> tuple[Tensor, None, None]:
        log_probs, targets = ctx.saved_tensors  # (N, V), (N,)
        smoothing, vocabulary = ctx.smoothing, log_probs.size(-1)
        grad = log_probs.exp().sub_(smoothing / vocabulary)  # softmax - ε / V: (N, V)
        on_target = grad.new_full((len(targets), 1), smoothing - 1.0)  # (N, 1)
        grad.scatter_add_(-1, targets.unsqueeze(-1), on_target)  # - (1 - ε) at each target
        return grad.mul_(grad_smoothed.unsqueeze(-1)).to(ctx.dtype), None, None


def length_mask(lengths: Tensor, steps: int) -> Tensor:
    """(B, steps) bool, True where step t < lengths[b]."""
    return torch.arange(steps, device=lengths.device) < lengths.unsqueeze(1)


def rows_per_image(image_index: Tensor, images: int) -> int | None:
    """k when `image_index` is k consecutive rows for each of `images` images in order
    (0, 0, 1, 1, ...), the layout in which captions share their image's memory; else None."""
    rows = len(image_index) // max(images, 1)
    expected = torch.arange(images, device=image_index.device).repeat_interleave(rows)  # (G k,)
    if rows == 0 or not torch.equal(image_index, expected):
        return None
    return rows


def select_rows(tensors: tuple[Tensor, ...], index: Tensor) -> tuple[Tensor, ...]:
    """Row `index[i]` of every tensor: per-image memory -> per-caption (or per-beam) memory."""
    return tuple(tensor.index_select(0, index) for tensor in tensors)


def lstm_update(gates: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
    """`nn.LSTMCell` after its matrix products: gates (B, 4H) in PyTorch's order i, f, g, o."""
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4, 1)  # (B, H) each
    # c = f * c + i * g, h = o * tanh(c), with i, f, o = sigmoid(...) and g = tanh(...)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
    return torch.sigmoid(output_gate) * torch.tanh(cell), cell


class Dropout(nn.Dropout):
    """`nn.Dropout` whose mask on a CPU comes from `torch.rand`: the same distribution, not the
    same random numbers, drawn 3x faster than by the `bernoulli_` that `nn.Dropout` uses there
    (7 of a 140 ms Show-and-Tell step at batch 80). Elsewhere it is `nn.Dropout` itself."""

    def forward(self, input: Tensor) -> Tensor:
        if not input.is_cpu or not self.training or self.p == 0.0:
            return super().forward(input)
        keep = (torch.rand_like(input) >= self.p).to(input.dtype)
        return input * keep.mul_(1.0 / (1.0 - self.p))


class CaptionDecoder(nn.Module):
    """Base of the decoders: word embedding in, dropout + linear head out, and the step API.

    Subclasses set `feature_kind` ("pooled": features (B, C); "spatial": features (B, L, C)) and
    implement `encode`, `init_state`, `advance` (one step from an embedded token) and
    `real_tokens` (a whole teacher-forced batch, computed only at its real tokens), from which
    the loss and the log-probabilities of whole captions follow here.
    """

    feature_kind: str
    max_words: int | None = None  # the most words a caption can have, where there is a limit

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size, padding_idx=PAD_ID)
        self.head = nn.Sequential(
            Dropout(config.dropout), nn.Linear(config.hidden_size, config.vocab_size)
        )
        # Per-channel statistics of the training features (set by `set_feature_statistics`,
        # saved with the weights); identity until set.
        self.register_buffer("feature_mean", torch.zeros(config.feature_size))
        self.register_buffer("feature_std", torch.ones(config.feature_size))

    def set_feature_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Standardize every feature channel with the training split's `mean` and `std` (C,).

        Frozen-CNN channels differ in scale and offset by orders of magnitude (a random-init CNN's
        by more than ImageNet ones'); fed raw, the few large channels drown the rest and a decoder
        can learn to ignore the image altogether. Standardized, every channel starts equal.
        """
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def standardize(self, features: Tensor) -> Tensor:
        """float32 features (..., C) with the training statistics applied."""
        return (features.float() - self.feature_mean) / self.feature_std

    # --- the step API used by all decoding ---------------------------------------------------

    def encode(self, features: Tensor) -> Memory:
        """Per-image work done once, before any step (e.g. the attention projection)."""
        raise NotImplementedError

    def init_state(self, memory: Memory) -> State:
        """The state before the first word: one row per memory row (repeat rows for k per image)."""
        raise NotImplementedError

    def advance(
        self, embedded: Tensor, state: State, memory: Memory
    ) -> tuple[Tensor, State, Tensor | None]:
        """One step from embedded input tokens (B, E): (logits (B, V), new state, alpha or None)."""
        raise NotImplementedError

    def step(
        self, tokens: Tensor, state: State, memory: Memory
    ) -> tuple[Tensor, State, Tensor | None]:
        """Feed `tokens` (B,): (float32 log-probs (B, V) of the next token, new state,
        alpha (B, L) or None)."""
        logits, state, alpha = self.advance(self.embedding(tokens), state, memory)
        return logits.float().log_softmax(-1), state, alpha

    # --- teacher forcing ---------------------------------------------------------------------
    # `features` are per image; `image_index` (B_cap,) maps each caption to its image row;
    # `captions` (B_cap, T) are ``<start> .. <end>`` padded with PAD_ID (a sampled caption cut
    # off at the length limit has no <end>); `lengths` (B_cap,) count start and end.

    def real_tokens(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> RealTokens:
        """The batch's real target tokens with their logits given the true prefix."""
        raise NotImplementedError

    def training_loss(
        self,
        features: Tensor,
        image_index: Tensor,
        captions: Tensor,
        lengths: Tensor,
        label_smoothing: float = 0.0,
        alpha_c: float = 0.0,
    ) -> LossOutput:
        """Label-smoothed cross entropy over the real tokens, plus `alpha_c` times the attention
        penalty (for a decoder that has one)."""
        real = self.real_tokens(features, image_index, captions, lengths)
        output = label_smoothed_loss(real.logits, real.targets, label_smoothing)
        if alpha_c == 0.0 or real.penalty is None:
            return output
        return output._replace(loss=output.loss + alpha_c * real.penalty())

    def caption_log_probs(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> Tensor:
        """(B_cap,) float32: the log-probability of each caption's words after <start> (and of
        its <end>, where it has one) under the distribution decoding samples from, which never
        draws <pad> or <start>: what self-critical training weighs by the reward."""
        real = self.real_tokens(features, image_index, captions, lengths)
        never = torch.tensor(NEVER_GENERATED, device=real.logits.device)
        log_probs = real.logits.float().index_fill(-1, never, float("-inf")).log_softmax(-1)
        token = log_probs.gather(-1, real.targets.unsqueeze(-1)).squeeze(-1)  # (N,)
        # each token's log-probability added to its caption's: (B_cap,)
        return token.new_zeros(len(captions)).index_add(0, real.captions, token)

    def teacher_forced_log_probs(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> Tensor:
        """(B_cap, max(lengths) - 1, V) float32 log-probs of each next token given the true prefix,
        computed the way training computes them; 0 at positions past a caption's end."""
        real = self.real_tokens(features, image_index, captions, lengths)
        log_probs = real.logits.new_zeros(
            (len(captions), int(lengths.max()) - 1, real.logits.size(-1)), dtype=torch.float32
        )
        log_probs[real.captions, real.positions] = real.logits.float().log_softmax(-1)
        return log_probs
