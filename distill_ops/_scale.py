"""The shared backward of losses that store their gradient in forward: scale rows in place."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("distill_ops::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, upstream: Tensor, backend: str) -> None:
    """``grad[i, :] *= upstream[i]`` in place; ``grad`` [N, V] or contiguous row groups [G, R, V] (N = G·R),
    ``upstream`` [N] (any stride, fp32).

    The Triton kernel skips rows whose incoming gradient is exactly 1 (decided on the device), so
    the usual ``loss.backward()`` after a folded ``mean`` / ``sum`` moves no [N, V] bytes; the PyTorch path
    skips the whole multiply on CPU tensors when every row's is 1.
    """
    grad = grad.view(-1, grad.shape[-1]) if grad.dim() == 3 else grad
    if backend == "triton":
        from .kernels.scale_rows import scale_rows_ as scale_rows_kernel

        scale_rows_kernel(grad, upstream.to(torch.float32))
    elif grad.device.type != "cpu" or not bool((upstream == 1).all()):
        # On the CPU that check reads no device: the usual backward of a folded mean / sum (every row's incoming
        # gradient 1) leaves the [N, V] buffer alone, as the kernel does. Elsewhere (a ROCm GPU runs this path)
        # it would synchronise, so every row is multiplied.
        grad.mul_(upstream.unsqueeze(-1))


@scale_rows_.register_fake
def _(grad, upstream, backend):
    return None


def refuse_double_backward() -> None:
    """A clear error for ``create_graph=True`` in a loss's backward (no autograd formula for the backward itself)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "distill_ops losses compute their gradient in the forward pass and are not twice differentiable: "
            "backward with create_graph=True (double backward, gradient penalties) is not supported"
        )


def saved_stored_gradient(ctx) -> Tensor:
    """The stored gradient saved by ``ctx.save_for_backward`` (its only saved tensor).

    Backward scales it in place, so a second backward through the same graph (``retain_graph=True``) finds it
    modified: autograd's version check then raises "modified by an inplace operation", whose hint (anomaly
    detection) points at the caller's code. This names the cause instead, as a ``RuntimeError`` chained to
    autograd's.
    """
    try:
        (stored,) = ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(
            "distill_ops losses store their gradient in the forward pass and the first backward uses it up (scaled in "
            "place, no [N, V] copy): a second backward through the same loss (retain_graph=True) is not supported, "
            "recompute the loss instead (with inplace_grad=True the stored gradient is student_logits' buffer: a "
            "write to it before backward has the same effect, and so has an activation checkpoint that recomputes "
            "the loss from those logits, which then hold the gradient: leave such a loss outside the checkpoint)"
        ) from error
    return stored


def consume_stored_gradient(stored: Tensor, upstream: Tensor | None, backend: str) -> Tensor | None:
    """Backward helper: the stored d(loss_row)/dz scaled by the incoming per-row gradient, in place.

    A second backward through the same graph raises (:func:`saved_stored_gradient`) instead of returning
    wrong values.
    The stored gradient is a constant, so a backward with ``create_graph=True`` (grad mode is on inside
    backward only then) raises instead of returning a gradient without its graph, which silently dropped the
    loss's curvature from, e.g., a gradient penalty.
    """
    if upstream is None:
        return None
    refuse_double_backward()
    torch.ops.distill_ops.scale_rows_(stored, upstream, backend)
    return stored


def register_stored_gradient_autograd(op_name: str, backend_index: int, num_inputs: int) -> None:
    """Autograd for a row-loss custom op whose outputs are (weighted row losses, stored d loss / d student,
    *extra non-differentiable outputs) and whose first input is the student: backward scales the stored
    gradient by the incoming per-row gradient (:func:`consume_stored_gradient`); other inputs get none.
    """

    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[backend_index]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # never allocate a zero [N, V] gradient for the second output
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, *unused_output_grads):
        return consume_stored_gradient(saved_stored_gradient(ctx), grad_loss, ctx.backend), *([None] * (num_inputs - 1))

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
