"""The layer-by-layer references of the decoders' fast paths, kept to check them against.

`PlainShowTell` is Show-and-Tell on the library's own layers: `nn.LSTM` itself over the image
embedding and over the packed captions, `nn.Dropout`, and autograd's own label-smoothed loss.

`PlainShowAttendTell` is the attention model written layer by layer: the modules called one after
another at every step (attention query, tanh, score, gate, LSTMCell, output layer) and the masked
loss over the full (captions, steps, vocabulary) logits. It has the same weights as
`ShowAttendTell`, so a state dict moves between the two. tests/test_models.py compares losses,
gradients and decoded captions with both references, and bench/attention_step.py and
bench/train.py time them as the baselines of the fast steps.

`PlainTransformer` is the transformer decoder built from `nn.MultiheadAttention` layers: every
caption gets its own copy of its image's memory, the training loss is masked over the full
(captions, steps, vocabulary) logits, and decoding runs the whole prefix through every layer at
every step, with no cache. `plain_transformer_weights` maps a `TransformerDecoder`'s state dict
onto it; tests/test_transformer.py compares losses, gradients and decoded captions with it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.models import DecoderConfig, ShowAttendTell, ShowTell
from captioner.models.base import (
    CaptionDecoder,
    LossOutput,
    Memory,
    State,
    length_mask,
    select_rows,
)
from captioner.models.show_attend_tell import attention_penalty


def masked_label_smoothed_loss(
    logits: Tensor, targets: Tensor, label_smoothing: float, mask: Tensor | None = None
) -> LossOutput:
    """Cross entropy with label smoothing over the real tokens only.

    `logits` (..., V) and `targets` (...); `mask` (...) is True at real tokens (None: all are real).
    Padding positions contribute nothing, whatever their logits hold. Equals
    ``F.cross_entropy(..., label_smoothing=ε, ignore_index=PAD_ID)`` on padded targets, but gives
    the unsmoothed NLL from the same log-softmax for free.
    """
    log_probs = logits.float().log_softmax(-1)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    smoothed = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)
    if mask is None:
        tokens = targets.numel()
    else:
        # where(), not multiplication: a NaN in a padded position must not leak into the sum.
        nll = torch.where(mask, nll, 0.0)
        smoothed = torch.where(mask, smoothed, 0.0)
        tokens = int(mask.sum())
    return LossOutput(smoothed.sum() / max(tokens, 1), tokens, nll.sum())


class PlainShowTell(ShowTell):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.head[0] = nn.Dropout(config.dropout)  # nn.Dropout, not the torch.rand mask

    def init_state(self, memory: Memory) -> State:
        (image_embedding,) = memory
        _, (h, c) = self.lstm(image_embedding.unsqueeze(1))
        return h.squeeze(0), c.squeeze(0)

    def advance(self, embedded: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, None]:
        h, c = state
        output, (h, c) = self.lstm(embedded.unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0)))
        return self.head(output.squeeze(1)), (h.squeeze(0), c.squeeze(0)), None

    def training_loss(
        self,
        features: Tensor,
        image_index: Tensor,
        captions: Tensor,
        lengths: Tensor,
        label_smoothing: float = 0.0,
        alpha_c: float = 0.0,
    ) -> LossOutput:
        h, c = self.init_state(select_rows(self.encode(features), image_index))
        steps = lengths.cpu() - 1
        inputs, targets = (
            pack_padded_sequence(padded, steps, batch_first=True, enforce_sorted=False)
            for padded in (self.embedding(captions[:, :-1]), captions[:, 1:])
        )
        outputs, _ = self.lstm(inputs, (h[None], c[None]))
        return masked_label_smoothed_loss(self.head(outputs.data), targets.data, label_smoothing)


class PlainShowAttendTell(ShowAttendTell):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.head[0] = nn.Dropout(config.dropout)  # nn.Dropout, not the torch.rand mask

    def advance(
        self, embedded: Tensor, state: State, memory: Memory
    ) -> tuple[Tensor, State, Tensor]:
        h, c = state
        features, projection = memory
        if len(h) > len(features):  # k rows per image (beams): copy the image's memory to each
            rows = len(h) // len(features)
            features, projection = (m.repeat_interleave(rows, 0) for m in memory)
        attention = self.attention
        query = attention.hidden_projection(h).unsqueeze(1)
        alpha = attention.score(torch.tanh(projection + query)).squeeze(2).softmax(-1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)
        gated = torch.sigmoid(self.gate(h)) * context
        h, c = self.cell(torch.cat([embedded, gated], 1), (h, c))
        return self.head(h), (h, c), alpha

    def _plain_teacher_forced(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        memory = select_rows(self.encode(features), image_index)
        state = self.init_state(memory)
        steps = int(lengths.max()) - 1
        embedded = self.embedding(captions[:, :steps])
        all_logits, all_alphas = [], []
        for t in range(steps):
            logits, state, alpha = self.advance(embedded[:, t], state, memory)
            all_logits.append(logits)
            all_alphas.append(alpha)
        return torch.stack(all_logits, 1), torch.stack(all_alphas, 1), captions[:, 1 : steps + 1]

    def training_loss(
        self,
        features: Tensor,
        image_index: Tensor,
        captions: Tensor,
        lengths: Tensor,
        label_smoothing: float = 0.0,
        alpha_c: float = 0.0,
    ) -> LossOutput:
        logits, alphas, targets = self._plain_teacher_forced(
            features, image_index, captions, lengths
        )
        mask = length_mask(lengths - 1, targets.size(1))
        output = masked_label_smoothed_loss(logits, targets, label_smoothing, mask)
        return output._replace(loss=output.loss + alpha_c * attention_penalty(alphas, mask))

    def teacher_forced_log_probs(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> Tensor:
        logits, _, _ = self._plain_teacher_forced(features, image_index, captions, lengths)
        return logits.float().log_softmax(-1)


class PlainTransformerLayer(nn.Module):
    """A pre-LN layer of `nn.MultiheadAttention` blocks: self-attention, cross-attention to the
    memory (decoder layers only), feed-forward."""

    def __init__(self, width: int, heads: int, ff_size: int, cross: bool) -> None:
        super().__init__()
        self.self_attention_norm = nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        if cross:
            self.cross_attention_norm = nn.LayerNorm(width)
            self.cross_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(
            nn.Linear(width, ff_size), nn.ReLU(), nn.Linear(ff_size, width)
        )

    def forward(
        self, x: Tensor, memory: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, d), memory (B, L, d), mask (T, T) True where a position may not look:
        the new x and the cross-attention weights averaged over heads (B, T, L)."""
        normed = self.self_attention_norm(x)
        x = x + self.self_attention(normed, normed, normed, attn_mask=mask, need_weights=False)[0]
        weights = None
        if memory is not None:
            normed = self.cross_attention_norm(x)
            attended, weights = self.cross_attention(normed, memory, memory)
            x = x + attended
        return x + self.feed_forward(self.feed_forward_norm(x)), weights


class PlainTransformer(CaptionDecoder):
    feature_kind = "spatial"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        width, heads, ff_size = config.hidden_size, config.heads, config.ff_size
        self.feature_projection = nn.Linear(config.feature_size, width)
        self.row_positions = nn.Parameter(torch.zeros(config.max_grid_side, width))
        self.column_positions = nn.Parameter(torch.zeros(config.max_grid_side, width))
        self.encoder_layers = nn.ModuleList(
            PlainTransformerLayer(width, heads, ff_size, cross=False)
            for _ in range(config.encoder_layers)
        )
        self.memory_norm = nn.LayerNorm(width)
        self.word_positions = nn.Parameter(torch.zeros(config.max_positions, width))
        self.layers = nn.ModuleList(
            PlainTransformerLayer(width, heads, ff_size, cross=True)
            for _ in range(config.decoder_layers)
        )
        self.output_norm = nn.LayerNorm(width)

    def encode(self, features: Tensor) -> Memory:
        """(the memory M (G, L, d),)"""
        side = math.isqrt(features.size(1))
        positions = [
            self.row_positions[row] + self.column_positions[column]
            for row in range(side)
            for column in range(side)
        ]
        memory = self.feature_projection(self.standardize(features)) + torch.stack(positions)
        for layer in self.encoder_layers:
            memory, _ = layer(memory)
        return (self.memory_norm(memory),)

    def init_state(self, memory: Memory) -> State:
        """(the embedded words so far (G, 0, d),)"""
        return (memory[0].new_zeros(len(memory[0]), 0, self.config.hidden_size),)

    def advance(
        self, embedded: Tensor, state: State, memory: Memory
    ) -> tuple[Tensor, State, Tensor]:
        (words,) = state
        (regions,) = memory
        words = torch.cat([words, embedded.unsqueeze(1)], 1)
        if len(words) > len(regions):  # k rows per image (beams): copy the image's memory to each
            regions = regions.repeat_interleave(len(words) // len(regions), 0)
        hidden, alpha = self._decode(words, regions)
        return self.head(hidden[:, -1]), (words,), alpha[:, -1]

    def _decode(self, embedded: Tensor, regions: Tensor) -> tuple[Tensor, Tensor]:
        """Embedded words (B, T, d) over the memory (B, L, d): the output-normed hidden states
        (B, T, d) and the last layer's cross-attention weights (B, T, L)."""
        steps = embedded.size(1)
        x = embedded * math.sqrt(self.config.hidden_size) + self.word_positions[:steps]
        future = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
        for layer in self.layers:
            x, alpha = layer(x, regions, future)
        return self.output_norm(x), alpha

    def training_loss(
        self,
        features: Tensor,
        image_index: Tensor,
        captions: Tensor,
        lengths: Tensor,
        label_smoothing: float = 0.0,
        alpha_c: float = 0.0,
    ) -> LossOutput:
        (regions,) = select_rows(self.encode(features), image_index)
        steps = int(lengths.max()) - 1
        hidden, _ = self._decode(self.embedding(captions[:, :steps]), regions)
        mask = length_mask(lengths - 1, steps)
        targets = captions[:, 1 : steps + 1]
        return masked_label_smoothed_loss(self.head(hidden), targets, label_smoothing, mask)


def plain_transformer_weights(fast_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A `TransformerDecoder` state dict as `PlainTransformer`'s: the fused projections become
    `nn.MultiheadAttention`'s stacked input projection ([W_q; W_k; W_v]) and its `out_proj`;
    every other name is the same."""
    plain = {}
    for name, tensor in fast_state.items():
        module, _, kind = name.rpartition(".")  # "layers.0.self_attention.output", "weight"
        attention, _, projection = module.rpartition(".")
        if projection == "query_key_value":
            plain[f"{attention}.in_proj_{kind}"] = tensor
        elif projection == "query":  # cross-attention: [W_q; W_k; W_v] from W_q and [W_k; W_v]
            key_value = fast_state[f"{attention}.key_value.{kind}"]
            plain[f"{attention}.in_proj_{kind}"] = torch.cat([tensor, key_value])
        elif projection == "output":
            plain[f"{attention}.out_proj.{kind}"] = tensor
        elif projection != "key_value":
            plain[name] = tensor
    return plain
