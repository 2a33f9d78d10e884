"""What the two deformable-convolution op pairs share (Triton: ``kernels/deform_conv.py``; CPU:
``kernels/cpu_deform.py``): both take ``(input, offset, mask, weight, bias, *conv)`` forward and return the
four kernel gradients ``(input, offset, mask, weight)`` from a backward op with three ``need_*`` flags, so
their autograd glue (which adds grad_bias, a plain reduction of grad_out, where it is wanted) and the
backward's fake kernel are written once here. No triton import."""

from __future__ import annotations

import torch

__all__ = ["backward_fake", "not_requested", "register_autograd"]


def not_requested(input: torch.Tensor) -> torch.Tensor:
    """What a backward op returns for a gradient it does not compute: an empty tensor, a fresh one each
    time (a custom op's outputs must not alias each other)."""
    return input.new_empty((0,))


def register_autograd(fwd, bwd) -> None:
    """Registers ``bwd`` as the gradient of the custom op ``fwd``."""

    def setup_context(ctx, inputs, output) -> None:
        input, offset, mask, weight, bias, *conv = inputs
        ctx.save_for_backward(input, offset, mask, weight)
        ctx.conv = conv

    def backward(ctx, grad_out: torch.Tensor):
        input, offset, mask, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gi, go, gm, gw = bwd(grad_out, input, offset, mask, weight, *ctx.conv, need[0], need[1] or need[2],
                             need[3])
        gb = None
        if need[4]:  # False without a bias; summed in fp32 (fp64 for fp64)
            gb = grad_out.sum((0, 2, 3), dtype=torch.promote_types(grad_out.dtype, torch.float32))
            gb = gb.to(grad_out.dtype)
        return (gi if need[0] else None, go if need[1] else None,
                gm if need[2] and mask is not None else None, gw if need[3] else None, gb,
                *([None] * len(ctx.conv)))

    fwd.register_autograd(backward, setup_context=setup_context)


def backward_fake(grad_out, input, offset, mask, weight, *conv_and_needs) -> tuple:
    """The backward op's outputs as fake tensors: a requested gradient has its operand's shape (grad_input
    contiguous), one not requested (or grad_mask without a mask) is empty."""
    need_input, need_offset_mask, need_weight = conv_and_needs[-3:]
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(input, memory_format=contiguous) if need_input else not_requested(input),
        offset.new_empty(offset.shape) if need_offset_mask else not_requested(input),
        mask.new_empty(mask.shape) if need_offset_mask and mask is not None else not_requested(input),
        weight.new_empty(weight.shape) if need_weight else not_requested(input),
    )
