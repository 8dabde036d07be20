"""Show, Attend and Tell (Xu et al., 2015) with soft (Bahdanau) attention over the H*W regions.

Two choices make training fast, and both are what the step API needs anyway:
- the attention projection of the features, the one large matrix product, is computed once per
  image in `encode` and shared by all of the image's captions through `image_index`
  (an `index_select` of the memory, never a recomputation, never once per step);
- masked full-length decoding: the whole batch runs to its longest caption and the loss is
  masked by length, so there is no sorting and no batch that shrinks step by step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captioner.models.base import (
    CaptionDecoder,
    DecoderConfig,
    LossOutput,
    Memory,
    State,
    label_smoothed_loss,
    length_mask,
    select_rows,
)


class Attention(nn.Module):
    """Additive attention: score_l = w . tanh(W_f f_l + W_h h)."""

    def __init__(self, feature_size: int, hidden_size: int, attention_size: int) -> None:
        super().__init__()
        self.feature_projection = nn.Linear(feature_size, attention_size)
        self.hidden_projection = nn.Linear(hidden_size, attention_size)
        self.score = nn.Linear(attention_size, 1)

    def project(self, features: Tensor) -> Tensor:
        """(B, L, C) -> (B, L, A): the per-image part, computed once."""
        return self.feature_projection(features)

    def forward(
        self, features: Tensor, projection: Tensor, hidden: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Context (B, C) and weights alpha (B, L) for hidden state (B, H)."""
        scores = self.score(torch.tanh(projection + self.hidden_projection(hidden).unsqueeze(1)))
        alpha = scores.squeeze(2).softmax(-1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)
        return context, alpha


class ShowAttendTell(CaptionDecoder):
    feature_kind = "spatial"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.attention = Attention(config.feature_size, config.hidden_size, config.attention_size)
        self.init_h = nn.Linear(config.feature_size, config.hidden_size)
        self.init_c = nn.Linear(config.feature_size, config.hidden_size)
        self.gate = nn.Linear(config.hidden_size, config.feature_size)  # f_beta in the paper
        self.cell = nn.LSTMCell(config.embed_size + config.feature_size, config.hidden_size)

    def encode(self, features: Tensor) -> Memory:
        """Spatial features (B, L, C) -> memory (features, attention projection (B, L, A))."""
        features = self.standardize(features)
        return features, self.attention.project(features)

    def init_state(self, memory: Memory) -> State:
        """h0, c0 (B, H) from the mean feature over the regions."""
        mean = memory[0].mean(1)
        return self.init_h(mean), self.init_c(mean)

    def advance(
        self, embedded: Tensor, state: State, memory: Memory
    ) -> tuple[Tensor, State, Tensor]:
        features, projection = memory
        h, c = state
        context, alpha = self.attention(features, projection, h)
        gated = torch.sigmoid(self.gate(h)) * context
        h, c = self.cell(torch.cat([embedded, gated], 1), (h, c))
        return self.head(h), (h, c), alpha

    def _teacher_forced(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits (B, S, V), alphas (B, S, L) and targets (B, S) for S = max(lengths) - 1 steps."""
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
        """Masked cross entropy plus the doubly stochastic attention penalty
        ``alpha_c * ((1 - sum_t alpha_t)^2).mean()``, where the sum runs over real steps only."""
        logits, alphas, targets = self._teacher_forced(features, image_index, captions, lengths)
        mask = length_mask(lengths.to(logits.device) - 1, targets.size(1))
        output = label_smoothed_loss(logits, targets, label_smoothing, mask)
        if alpha_c == 0.0:
            return output
        attention_per_region = (alphas * mask.unsqueeze(2)).sum(1)
        penalty = alpha_c * ((1.0 - attention_per_region) ** 2).mean()
        return output._replace(loss=output.loss + penalty)

    def teacher_forced_log_probs(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> Tensor:
        logits, _, _ = self._teacher_forced(features, image_index, captions, lengths)
        return logits.float().log_softmax(-1)
