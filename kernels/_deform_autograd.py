"""What the two deformable-convolution op pairs share (Triton: ``kernels/deform_conv.py``; CPU:
``kernels/cpu_deform.py``): both take ``(input, offset, mask, weight, bias, *conv)`` forward and return the
five gradients ``(input, offset, mask, weight, bias)`` from a backward op with three ``need_*`` flags, so
their autograd glue and the backward's fake kernel are written once here. No triton import."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["backward_fake", "register_autograd"]


def register_autograd(fwd, bwd, flag: Callable = bool) -> None:
    """Registers ``bwd`` as the gradient of the custom op ``fwd``. ``flag`` converts the need flags to
    what ``bwd`` takes (``int`` for the Triton op)."""

    def setup_context(ctx, inputs, output) -> None:
        input, offset, mask, weight, bias, *conv = inputs
        ctx.save_for_backward(input, offset, mask, weight)
        ctx.conv, ctx.has_bias = conv, bias is not None

    def backward(ctx, grad_out: torch.Tensor):
        input, offset, mask, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gi, go, gm, gw, gb = bwd(grad_out, input, offset, mask, weight, *ctx.conv,
                                 flag(need[0]), flag(need[1] or need[2]), flag(need[3]))
        return (gi if need[0] else None, go if need[1] else None,
                gm if need[2] and mask is not None else None, gw if need[3] else None,
                gb if need[4] and ctx.has_bias else None, *([None] * len(ctx.conv)))

    fwd.register_autograd(backward, setup_context=setup_context)


def backward_fake(grad_out, input, offset, mask, weight, *conv_and_needs) -> tuple:
    """The backward op's outputs as fake tensors: a requested gradient has its operand's shape (grad_input
    contiguous), one not requested (or grad_mask without a mask) is empty."""
    need_input, need_offset_mask, need_weight = conv_and_needs[-3:]
    empty = lambda: input.new_empty((0,))  # distinct empty tensors: a custom op's outputs must not alias
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if need_input else empty(),
        offset.new_empty(offset.shape) if need_offset_mask else empty(),
        mask.new_empty(mask.shape) if need_offset_mask and mask is not None else empty(),
        weight.new_empty(weight.shape) if need_weight else empty(),
        grad_out.new_empty((weight.shape[0],)),
    )
