"""Plain implementations of the decoders' fast paths, kept to check them against.

`PlainShowAttendTell` is the attention model written layer by layer, as it was before its step was
made fast: the modules called one after another at every step (attention query, tanh, score,
gate, LSTMCell, output layer) and the masked loss over the full (captions, steps, vocabulary)
logits. It has the same weights as `ShowAttendTell`, so a state dict moves between the two.
tests/test_models.py compares losses, gradients and decoded captions with it, and
bench/attention_step.py times it as the baseline of the fast step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.models import LossOutput, ShowAttendTell
from captioner.models.base import Memory, State, label_smoothed_loss, length_mask, select_rows
from captioner.models.show_attend_tell import attention_penalty


class PlainShowAttendTell(ShowAttendTell):
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
        output = label_smoothed_loss(logits, targets, label_smoothing, mask)
        return output._replace(loss=output.loss + alpha_c * attention_penalty(alphas, mask))

    def teacher_forced_log_probs(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> Tensor:
        logits, _, _ = self._plain_teacher_forced(features, image_index, captions, lengths)
        return logits.float().log_softmax(-1)
