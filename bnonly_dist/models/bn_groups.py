"""BatchNorm statistics over a fixed number of images (train.bn_batch), whatever the world size.

Rank r holds the r-th consecutive slice of every global batch, so "consecutive groups of n
images of the global batch" is the same set of images on 1 GPU or 512:

- n divides the rank's b images: the rank splits them into b/n groups ("ghost" batches),
  each normalised with its own mean and variance;
- b divides n: n/b consecutive ranks form one group; each rank's count, mean and sum of
  squared deviations are all-gathered in that group's process group (made once at start,
  dist.bn_group) and combined exactly (Chan et al.'s pairwise rule), so every rank of the
  group normalises with the group's statistics. Backward all-reduces the two gradient
  sums (sum dy, sum dy * (x - mean)) in the same group.

Statistics and the sums of backward are accumulated in fp32 (fp64 for fp64 inputs), also
under bf16 autocast. The running statistics follow the mean over this rank's groups of
each group's mean and unbiased variance; average_running_statistics (below) averages them
over the ranks, which is then exactly what one process holding every group would have.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist

from bnonly_dist.models.bitmask import apply_mask, pack_bits


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(stat: torch.Tensor) -> torch.Tensor:
    """(C,) -> broadcastable against (N, C, H, W)."""
    return stat[None, :, None, None]


def _local_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of x, accumulated in fp32 (fp64 for fp64)."""
    if x.is_cuda:  # one pass, fp32 statistics of a bf16 tensor without a copy (SyncBatchNorm's kernel)
        mean, invstd = torch.batch_norm_stats(x, eps)
        return mean, invstd.pow(-2) - eps
    var, mean = torch.var_mean(x.to(_accumulator(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def _combine(count: float, mean: torch.Tensor, m2: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The group's (mean, sum of squared deviations, count) from every member's (collective: all-gather in group)."""
    mine = torch.cat([torch.full_like(mean[:1], count), mean, m2])  # (1 + 2C,)
    gathered = torch.empty(torch_dist.get_world_size(group) * mine.numel(), dtype=mine.dtype, device=mine.device)
    torch_dist.all_gather_into_tensor(gathered, mine, group=group)
    gathered = gathered.view(-1, mine.numel())
    counts, means, m2s = gathered[:, :1], gathered[:, 1:1 + mean.numel()], gathered[:, 1 + mean.numel():]
    total = counts.sum()
    combined_mean = (counts * means).sum(0) / total
    combined_m2 = m2s.sum(0) + (counts * (means - combined_mean) ** 2).sum(0)
    return combined_mean, combined_m2, float(total)


class GroupBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over groups of the batch (and across ranks), optionally + ReLU.

    Ghost groups run nn.BatchNorm2d's own kernels on each group (a slice along the batch,
    contiguous in NCHW and NHWC alike); a synchronised group normalises with the combined
    statistics through the same kernel in inference form."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu, per_rank, group):
        if x.shape[0] % per_rank:
            raise ValueError(f"a batch of {x.shape[0]} images does not split into {per_rank} BN groups "
                             "(train.bn_batch)")
        n = x.shape[0] // per_rank
        count = float(n * x[0, 0].numel())  # elements per channel of one group on this rank
        if group is None:
            outs, means, invstds = zip(*(torch.native_batch_norm(x[k * n:(k + 1) * n], weight, bias, None, None,
                                                                  True, 0.0, eps) for k in range(per_rank)))
            out = torch.cat(outs)
            mean, invstd = torch.stack(means), torch.stack(invstds)  # (groups, C)
            variance = invstd.pow(-2) - eps
        else:  # one group per rank here: combine it with the other ranks' parts
            local_mean, local_var = _local_stats(x, eps)
            mean, m2, count = _combine(count, local_mean, local_var * count, group)
            variance = m2 / count
            out, _, _ = torch.native_batch_norm(x, weight, bias, mean.to(weight.dtype), variance.to(weight.dtype),
                                                False, 0.0, eps)
            mean, variance = mean[None], variance[None]
            invstd = torch.rsqrt(variance + eps)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.mean(0).to(running_mean.dtype), alpha=momentum)
            unbiased = (variance * (count / max(count - 1, 1))).mean(0)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        positive = out.relu_().bool() if relu else None
        ctx.save_for_backward(x, pack_bits(positive) if relu else None, weight, mean, invstd)
        ctx.mask_layout = (positive.shape, positive.stride()) if relu else None
        ctx.per_rank, ctx.group, ctx.count, ctx.eps = per_rank, group, count, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, weight, mean, invstd = ctx.saved_tensors
        if ctx.mask_layout is not None:
            grad_out = apply_mask(grad_out, mask, *ctx.mask_layout)
        needs = ctx.needs_input_grad
        if ctx.group is None:
            n = x.shape[0] // ctx.per_rank
            parts = [torch.ops.aten.native_batch_norm_backward(
                grad_out[k * n:(k + 1) * n], x[k * n:(k + 1) * n], weight, None, None, mean[k], invstd[k], True,
                ctx.eps, [needs[0], needs[1], needs[2]]) for k in range(ctx.per_rank)]
            grad_in = torch.cat([p[0] for p in parts]) if needs[0] else None
            grad_weight = torch.stack([p[1] for p in parts]).sum(0) if needs[1] else None
            grad_bias = torch.stack([p[2] for p in parts]).sum(0) if needs[2] else None
            return grad_in, grad_weight, grad_bias, None, None, None, None, None, None, None
        acc = _accumulator(x.dtype)
        mean, invstd = mean[0], invstd[0]
        dy = grad_out.to(acc)
        centred = x.to(acc) - _per_channel(mean)
        sum_dy = dy.sum((0, 2, 3))  # this rank's part
        sum_dy_xmu = (dy * centred).sum((0, 2, 3))
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if needs[1] else None
        grad_bias = sum_dy.to(weight.dtype) if needs[2] else None
        grad_in = None
        if needs[0]:  # collective: the group's two sums (one all-reduce of 2C numbers)
            sums = torch.cat([sum_dy, sum_dy_xmu])
            torch_dist.all_reduce(sums, group=ctx.group)
            sum_dy, sum_dy_xmu = sums[:sums.numel() // 2], sums[sums.numel() // 2:]
            grad = dy - _per_channel(sum_dy / ctx.count) - centred * _per_channel(invstd ** 2 * sum_dy_xmu / ctx.count)
            grad_in = torch.empty_like(x)
            torch.mul(grad, _per_channel(invstd * weight.to(acc)), out=grad_in)  # rounded once into x's dtype
        return grad_in, grad_weight, grad_bias, None, None, None, None, None, None, None


def running_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every BN's running mean and running variance, in module order."""
    return [t for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats for t in (m.running_mean, m.running_var)]


def average_running_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """Replace every BN's running statistics by their mean over the world's ranks; returns this
    rank's own (copies). Collective: one all-reduce of all of them on the device's backend.

    Each rank's running averages follow its own groups; an exponential average is linear, so
    their mean over the ranks is what one process holding every group would have."""
    stats = running_statistics(model)
    own = [t.detach().clone() for t in stats]
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1 and stats:
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
                          for t in stats])
        torch_dist.all_reduce(flat)
        flat /= torch_dist.get_world_size()
        offset = 0
        with torch.no_grad():
            for t in stats:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
    return own


def restore_running_statistics(model: torch.nn.Module, own: list[torch.Tensor]) -> None:
    """Put back what average_running_statistics returned (this rank's own running statistics)."""
    with torch.no_grad():
        for t, saved in zip(running_statistics(model), own, strict=True):
            t.copy_(saved)
