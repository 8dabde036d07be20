"""Weights applied at every step of a recurrent loop, with their gradients taken once per loop.

Autograd computes the gradient of a weight used at every step as one small product per step
(batch rows x weight size) and sums them as it goes: 20 steps of a (2048 x 2048) matrix for 30
captions is 20 thin products and 20 additions into 16 MB. `LoopWeight` keeps each step's input
and output gradient instead and takes the weight's gradient once, when the backward pass has gone
through every step, as one product over all steps (what the word half of an LSTM input gets for
free by being computed before the loop). Values and gradients are those of `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class LoopWeight:
    """``x @ cat(weights).T`` for the inputs x of every step of one loop (one forward pass).

    While autograd records, the weights are stacked once and each step is one product; without
    gradients (decoding) each step makes one product per weight instead, as stacking the weights
    at every step would cost more than the step.
    """

    def __init__(self, *weights: Tensor) -> None:
        self.steps = _Steps()
        self.weights = weights  # (O_i, I) each: O = the sum of the O_i outputs
        # Under autocast the plain products let autocast choose the dtypes.
        self.deferred = (
            torch.is_grad_enabled()
            and any(weight.requires_grad for weight in weights)
            and not torch.is_autocast_enabled(weights[0].device.type)
        )
        if self.deferred:
            self.weight = _LoopGradient.apply(torch.cat(weights), self.steps)  # (O, I)

    def __call__(self, inputs: Tensor) -> Tensor:
        """One step's product: inputs (R, I) -> (R, O)."""
        if self.deferred:
            return _StepProduct.apply(inputs, self.weight, self.steps)
        if len(self.weights) == 1:
            return F.linear(inputs, self.weights[0])
        return torch.cat([F.linear(inputs, weight) for weight in self.weights], -1)


class _Steps:
    """Each step's input and output gradient, kept by the backward pass until the loop's weight
    gradient is taken. (The autograd nodes hold this, not the LoopWeight, whose weight they made:
    that would be a reference cycle, kept alive until Python's cycle collector runs.)"""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []


class _LoopGradient(torch.autograd.Function):
    """The weight as every step sees it. Its backward runs once all steps' backward have run
    (they all depend on it) and turns their saved inputs and gradients into the weight's."""

    @staticmethod
    def forward(ctx, weight: Tensor, steps: _Steps) -> Tensor:
        ctx.steps = steps
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, _unused: Tensor) -> tuple[Tensor, None]:
        steps = ctx.steps
        # the output gradients of all steps (sum of R_t, O), transposed, times their inputs
        # (sum of R_t, I)
        grad = torch.cat(steps.grads).t() @ torch.cat(steps.inputs)  # (O, I)
        steps.inputs.clear()
        steps.grads.clear()
        return grad, None


class _StepProduct(torch.autograd.Function):
    """One step's product; its backward gives the input's gradient and leaves the weight's to
    `_LoopGradient` (None here, which autograd counts as zero)."""

    @staticmethod
    def forward(ctx, inputs: Tensor, weight: Tensor, steps: _Steps) -> Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.steps = steps
        return F.linear(inputs, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        inputs, weight = ctx.saved_tensors  # (R, I), (O, I)
        ctx.steps.inputs.append(inputs)
        ctx.steps.grads.append(grad)  # (R, O)
        return grad @ weight, None, None  # the input's gradient (R, I)
