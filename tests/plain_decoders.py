"""The layer-by-layer references of the decoders' fast paths, kept to check them against.

`PlainShowTell` is Show-and-Tell on the library's own layers: `nn.LSTM` itself over the image
embedding and over the packed captions, `nn.Dropout`, and autograd's own label-smoothed loss.

`PlainShowAttendTell` is the attention model written layer by layer: the modules called one after
another at every step (attention query, tanh, score, gate, LSTMCell, output layer) and the masked
loss over the full (captions, steps, vocabulary) logits. It has the same weights as
`ShowAttendTell`, so a state dict moves between the two. tests/test_models.py compares losses,
gradients and decoded captions with both references, and bench/attention_step.py and
bench/train.py time them as the baselines of the fast steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.models import DecoderConfig, ShowAttendTell, ShowTell
from captioner.models.base import LossOutput, Memory, State, length_mask, select_rows
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
