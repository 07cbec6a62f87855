"""Conv2d, BatchNorm2d and ReLU with a lean autograd path for frozen convolutions.

Plain autograd saves every convolution input even when the weight is frozen (so that
it could compute a weight gradient nobody asked for; pytorch/pytorch#133566). With
`lean` on (see set_lean):

- a Conv2d whose weight is frozen saves only that weight: its input gradient is a
  transposed convolution of the output gradient and needs no activation;
- a BatchNorm2d in training saves one full tensor, its input (in the compute dtype),
  and, when it ends in a ReLU (`bn(x, relu=True)`), that ReLU's sign as 1 bit per
  element instead of the ReLU's output;
- a ReLU saves only its 1-bit sign;
- a max pool saves its argmax positions as int32, not its input and int64 positions;
  its backward adds shared maxima in fp32 (at least) in the forward's memory layout.

The BN keeps its input rather than the normalised input x_hat: the same bytes, but
forward and backward then run nn.BatchNorm2d's own kernels, with no extra pass to form
x_hat and the same gradients. A BasicBlock keeps about two activations instead of four
(tests/test_lean.py checks gradients and bytes). Eval mode and no-grad use the plain path.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from bnonly_dist.models.bitmask import apply_mask, pack_bits
from bnonly_dist.models.bn_groups import GroupBatchNormFunction

_recompute = threading.local()  # set while activation checkpointing recomputes a segment

class FrozenConv2dFunction(torch.autograd.Function):
    """conv2d with a frozen weight: saves the weight, returns only the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        # The input gradient is the transposed convolution; output_padding restores the rows
        # and columns a strided forward dropped. Autocast ran the forward in grad_out's dtype;
        # autograd casts the result back to x's.
        kept = [(out - 1) * s - 2 * p + d * (k - 1) + 1
                for out, s, p, d, k in zip(grad_out.shape[2:], stride, padding, dilation, weight.shape[2:])]
        extra = [size - k for size, k in zip(shape[2:], kept)]
        grad_in = F.conv_transpose2d(grad_out, weight.to(grad_out.dtype), None, stride, padding, extra, groups,
                                     dilation)
        return grad_in, None, None, None, None, None


class BatchNormReLUFunction(torch.autograd.Function):
    """Training-mode batch norm, optionally followed by ReLU, saving its input and a 1-bit mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu):
        # The same kernel as nn.BatchNorm2d: same output, same running-statistics update.
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        positive = out.relu_().bool() if relu else None  # after ReLU non-zero means positive (fast on CPU)
        ctx.save_for_backward(x, pack_bits(positive) if relu else None, weight, mean, invstd)
        ctx.relu, ctx.eps = relu, eps
        ctx.mask_layout = (positive.shape, positive.stride()) if relu else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, weight, mean, invstd = ctx.saved_tensors
        if ctx.relu:
            grad_out = apply_mask(grad_out, mask, *ctx.mask_layout)
        needs = ctx.needs_input_grad
        grad_in, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [needs[0], needs[1], needs[2]])
        return grad_in, grad_weight, grad_bias, None, None, None, None, None


class ReLUMaskFunction(torch.autograd.Function):
    """ReLU that saves its sign as 1 bit per element."""

    @staticmethod
    def forward(ctx, x):
        out = x.relu_()  # in place, as nn.ReLU(inplace=True): x is the block's fresh sum
        ctx.mark_dirty(out)
        positive = out.bool()
        ctx.save_for_backward(pack_bits(positive))
        ctx.layout = positive.shape, positive.stride()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return apply_mask(grad_out, mask, *ctx.layout)


class MaxPoolFunction(torch.autograd.Function):
    """max_pool2d that saves only the argmax positions, as int32, not its input."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding):
        out, argmax = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding)
        ctx.save_for_backward(argmax.to(torch.int32))  # positions within a plane: H * W < 2**31
        ctx.shape, ctx.dtype = x.shape, x.dtype
        ctx.nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (argmax,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        acc = torch.promote_types(grad_out.dtype, torch.float32)  # bf16 sums in fp32, fp64 stays fp64
        # Overlapping windows may share a maximum: add, as max_pool2d's own backward does, in
        # fp32 (no bf16 atomics on a GPU), in the forward's layout (no NCHW copy of NHWC).
        if ctx.nhwc:  # (n, positions, c) views of NHWC tensors
            grad_in = grad_out.new_zeros((n, h * w, c), dtype=acc)
            grad_in.scatter_add_(1, argmax.permute(0, 2, 3, 1).reshape(n, -1, c).long(),
                                 grad_out.permute(0, 2, 3, 1).reshape(n, -1, c).to(acc))
            grad_in = grad_in.view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            grad_in = grad_out.new_zeros((n, c, h * w), dtype=acc)
            grad_in.scatter_add_(2, argmax.reshape(n, c, -1).long(), grad_out.reshape(n, c, -1).to(acc))
            grad_in = grad_in.view(n, c, h, w)
        return grad_in.to(ctx.dtype), None, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, when lean and frozen, saves only its weight for backward."""

    lean = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and not self.weight.requires_grad and self.bias is None and x.requires_grad \
                and self.padding_mode == "zeros" and torch.is_grad_enabled():
            return FrozenConv2dFunction.apply(x, self.weight, self.stride, self.padding, self.dilation, self.groups)
        return super().forward(x)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with an optional fused ReLU (`bn(x, relu=True)`), the lean path, and
    statistics over groups of the batch or across ranks (models/bn_groups.py, set_bn_groups)."""

    lean = False
    groups_per_rank = 1  # ghost batches inside this rank's batch
    sync_group = None  # process group of the ranks that share one statistic (None: this rank alone)

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            out = super().forward(x)
            return F.relu(out, inplace=True) if relu else out
        if getattr(_recompute, "active", False):
            # Recomputed for activation checkpointing: the same computation, but the running
            # statistics were updated by the first forward, so throwaway copies take this one.
            running_mean, running_var, momentum = self.running_mean.clone(), self.running_var.clone(), 0.0
        else:
            running_mean, running_var = self.running_mean, self.running_var
            self.num_batches_tracked.add_(1)
            # nn.BatchNorm2d's update factor (momentum=None: a cumulative average)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        lean = self.lean and torch.is_grad_enabled()
        if self.groups_per_rank > 1 or self.sync_group is not None:
            # A recomputed segment runs the same collectives in the same order on every rank of
            # the group (each recomputes it in its own backward).
            out = GroupBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var, momentum,
                                               self.eps, relu and lean, self.groups_per_rank, self.sync_group)
            return F.relu(out, inplace=True) if relu and not lean else out
        if lean:
            return BatchNormReLUFunction.apply(x, self.weight, self.bias, running_mean, running_var, momentum,
                                               self.eps, relu)
        out = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, True, momentum, self.eps)
        return F.relu(out, inplace=True) if relu else out


class ReLU(nn.ReLU):
    """nn.ReLU(inplace=True) that, when lean, saves a 1-bit sign instead of its output."""

    lean = False

    def __init__(self):
        super().__init__(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and x.requires_grad and torch.is_grad_enabled():
            return ReLUMaskFunction.apply(x)
        return super().forward(x)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that, when lean, saves int32 argmax positions instead of its input and int64 ones."""

    lean = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and x.requires_grad and torch.is_grad_enabled() and self.dilation == 1 \
                and not self.ceil_mode and not self.return_indices:
            return MaxPoolFunction.apply(x, self.kernel_size, self.stride, self.padding)
        return super().forward(x)


def set_bn_groups(model: nn.Module, groups_per_rank: int, sync_group) -> None:
    """Every BN of model computes its statistics over groups_per_rank groups of this rank's
    batch, or (sync_group) over the ranks of that process group (models/bn_groups.py)."""
    for module in model.modules():
        if isinstance(module, BatchNorm2d):
            module.groups_per_rank, module.sync_group = groups_per_rank, sync_group


def set_lean(model: nn.Module, enabled: bool) -> None:
    """Switch the lean autograd path of every layer in model on or off."""
    for module in model.modules():
        if isinstance(module, (Conv2d, BatchNorm2d, ReLU, MaxPool2d)):
            module.lean = enabled


@contextlib.contextmanager
def _recomputing():
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = False


class Stage(nn.Sequential):
    """A residual stage: its blocks in order, optionally under activation checkpointing.

    checkpointed: only the inputs of about sqrt(blocks) segments are kept, and each
    segment is recomputed during backward, so a stage holds O(sqrt(blocks)) blocks'
    activations at a time (for ResNet-866-deep stages) for about one extra forward.
    """

    checkpointed = False

    def segments(self) -> list[list[nn.Module]]:
        """The blocks in about sqrt(blocks) consecutive segments, each recomputed as one."""
        blocks = list(self)
        size = max(1, round(len(blocks) ** 0.5))
        return [blocks[start:start + size] for start in range(0, len(blocks), size)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.checkpointed and torch.is_grad_enabled()):
            return super().forward(x)
        for segment in self.segments():
            x = torch.utils.checkpoint.checkpoint(_run_blocks, segment, x, use_reentrant=False,
                                                  context_fn=_checkpoint_contexts)
        return x


def _run_blocks(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def _checkpoint_contexts():
    return contextlib.nullcontext(), _recomputing()
