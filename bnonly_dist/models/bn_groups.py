"""BatchNorm statistics over a fixed number of images (train.bn_batch), whatever the world size.

Rank r holds the r-th consecutive slice of every global batch, so "consecutive groups of n
images of the global batch" is the same set of images on 1 GPU or 512:

- n divides the rank's b images: the rank splits them into b/n groups ("ghost" batches),
  each normalised with its own mean and variance;
- b divides n: n/b consecutive ranks form one group, in that group's process group (made
  once at start, dist.bn_group); every rank of the group normalises with the group's
  statistics, and backward all-reduces the two gradient sums (sum dy, sum dy * x_hat).

No step waits for the device: every count is known on the host (images x H x W, the same
on every rank of a group), and nothing turns a tensor into a Python number. How, per path:

- ghost groups (any device): each group runs the native BN kernel into its slice of one
  output (native_batch_norm's out=; a slice along the batch is contiguous in NCHW and NHWC
  alike), the kernel also updating the running statistics by the group's share of the
  momentum (_group_momentum). Backward: each group's two sums in one pass of the native
  kernels, then the input gradient written into one tensor by elementwise passes over every
  group at once (weight * invstd * dy, then + the terms in x; on CUDA the other way round):
  no copy and no temporary of the layer's size.
- synchronised on CUDA: nn.SyncBatchNorm's kernels (batch_norm_stats, an all-gather of
  mean and invstd, batch_norm_gather_stats_with_counts with the known counts,
  batch_norm_elemt; batch_norm_backward_reduce, an all-reduce of the two sums,
  batch_norm_backward_elemt). Unlike nn.SyncBatchNorm no rank is ever empty here, so no
  rank's statistics are dropped by value (its count_all[mask] waits for the GPU).
- synchronised on the CPU (gloo): the BN kernel's local statistics, combined exactly
  (Chan et al.'s pairwise rule, which for equal counts is the mean of the means and of the
  variances plus the variance of the means), normalised by the inference BN kernel;
  backward as a ghost group's, with the group's all-reduced sums (the dy term of the input
  gradient is written while they travel).

Statistics and the sums of backward are accumulated in fp32 (fp64 for fp64 inputs), also
under bf16 autocast. The running statistics follow the mean over this rank's groups of
each group's mean and unbiased variance; average_running_statistics (below) averages them
over the ranks, which is then exactly what one process holding every group would have.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist

from bnonly_dist.models.bitmask import apply_mask, pack_bits


# The single-tensor all-gather: torch >= 2.12 names it all_gather_single (and deprecates the old name); the
# torch of the GPU nodes (2.11), like every torch since 2.4 (pyproject.toml), has all_gather_into_tensor.
all_gather_single = getattr(torch_dist, "all_gather_single", None) or torch_dist.all_gather_into_tensor


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _update_running(running_mean, running_var, momentum: float, mean, variance, count: int) -> None:
    """Running statistics <- the group's mean and unbiased variance (over count elements), as the native kernel."""
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((variance * (count / max(count - 1, 1))).to(running_var.dtype), momentum)


def _sums(dy, x, mean, invstd, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy, sum dy * x_hat) per channel of this part, x_hat = (x - mean) * invstd: one pass of a native kernel."""
    if x.is_cuda:
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, True, False, False)
        return sum_dy, sum_dy_xmu * invstd
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(dy, x, weight, None, None, mean, invstd, True,
                                                                       eps, [False, True, True])
    return sum_dy, sum_dy_xhat


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> (groups, N / groups, C, H, W): a view in NCHW and NHWC alike."""
    return t.view(groups, -1, *t.shape[1:])


def _per_group_channel(stat: torch.Tensor) -> torch.Tensor:
    """(groups, C) -> broadcastable against _grouped's (groups, n, C, H, W): one view."""
    return stat.view(stat.shape[0], 1, stat.shape[1], 1, 1)


def _scale(weight, invstd) -> torch.Tensor:
    """weight * invstd, (groups, C) rows: the factor of dy in BN's input gradient."""
    return weight.to(invstd.dtype) * invstd


def _dy_term_into(out, dy, scale) -> None:
    """out <- scale * dy for each group. It needs only this rank's numbers: the synchronised backward runs it
    while its sums travel."""
    torch.mul(_grouped(dy, scale.shape[0]), _per_group_channel(scale), out=_grouped(out, scale.shape[0]))


def _add_dy_term(out, dy, scale) -> None:
    """out += scale * dy for each group."""
    _grouped(out, scale.shape[0]).addcmul_(_grouped(dy, scale.shape[0]), _per_group_channel(scale))


def _x_terms(mean, invstd, scale, sum_dy, sum_dy_xhat, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slope, offset), (groups, C) rows: -weight * invstd * (sum_dy + x_hat * sum_dy_xhat) / count, with
    x_hat = (x - mean) * invstd and scale = weight * invstd, is slope * x + offset."""
    scale = scale * (-1.0 / count)
    slope = scale * invstd * sum_dy_xhat
    return slope, torch.addcmul(scale * sum_dy, slope, mean, value=-1)


def _add_x_terms(out, x, slope, offset) -> None:
    """out += slope * x + offset per group, in two passes: on the CPU they beat one addcmul with two broadcast
    operands in NCHW (3x)."""
    grouped = _grouped(out, slope.shape[0])
    grouped.addcmul_(_grouped(x, slope.shape[0]), _per_group_channel(slope))
    grouped.add_(_per_group_channel(offset))


def _input_grad_into(out, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count: int) -> None:
    """out <- BN's input gradient weight * invstd * (dy - (sum_dy + x_hat * sum_dy_xhat) / count) of each group
    of consecutive images, given its statistics and sums ((groups, C) rows) over count elements, written into
    out with no temporary of its size, all groups in each elementwise pass."""
    groups, scale = mean.shape[0], _scale(weight, invstd)
    if x.is_cuda:  # (x - mean) * invstd * w + b in one pass: nn.SyncBatchNorm's elementwise kernel, into out
        w, b = -scale * sum_dy_xhat / count, -scale * sum_dy / count
        for k, (x_k, out_k) in enumerate(zip(x.chunk(groups), out.chunk(groups))):
            torch.batch_norm_elemt(x_k, w[k], b[k], mean[k], invstd[k], 0.0, out=out_k)
        _add_dy_term(out, dy, scale)
    elif x.is_contiguous():  # NCHW: three passes (see _add_x_terms)
        _dy_term_into(out, dy, scale)
        _add_x_terms(out, x, *_x_terms(mean, invstd, scale, sum_dy, sum_dy_xhat, count))
    else:  # NHWC: offset + slope * x, then + scale * dy: two passes, 15-20 % less time than three here
        slope, offset = _x_terms(mean, invstd, scale, sum_dy, sum_dy_xhat, count)
        torch.addcmul(_per_group_channel(offset), _grouped(x, groups), _per_group_channel(slope),
                      out=_grouped(out, groups))
        _add_dy_term(out, dy, scale)


def _group_momentum(momentum: float, k: int, groups: int) -> float:
    """The update factor of group k's (0-based) running-statistics update, so that the groups' updates in
    turn leave running <- (1 - momentum) * running + momentum * (mean over the groups of their statistics):
    momentum / (groups - momentum * (groups - 1 - k)); the last group's is momentum / groups."""
    return momentum / (groups - momentum * (groups - 1 - k))


def _ghost_forward(x, weight, bias, running_mean, running_var, momentum: float, groups: int, eps: float):
    """Each group through the native BN kernel into its slice of one output, the kernel updating the running
    statistics by each group's share (_group_momentum): (out, means, invstds), (groups, C)."""
    out = torch.empty_like(x)
    mean = x.new_empty((groups, x.shape[1]), dtype=_accumulator(x.dtype))
    invstd = torch.empty_like(mean)
    for k, (x_k, out_k, mean_k, invstd_k) in enumerate(zip(x.chunk(groups), out.chunk(groups), mean, invstd)):
        torch.native_batch_norm(x_k, weight, bias, running_mean, running_var, True,
                                _group_momentum(momentum, k, groups), eps, out=(out_k, mean_k, invstd_k))
    return out, mean, invstd


def _ghost_backward(dy, x, weight, mean, invstd, eps: float, count: int, needs):
    """(input gradient, written into one tensor; affine gradients summed over the groups)."""
    groups = mean.shape[0]
    sum_dy, sum_dy_xhat = (torch.stack(sums) for sums in zip(*(
        _sums(dy_k, x_k, mean_k, invstd_k, weight, eps)
        for dy_k, x_k, mean_k, invstd_k in zip(dy.chunk(groups), x.chunk(groups), mean, invstd))))
    grad_in = None
    if needs[0]:
        grad_in = torch.empty_like(x)
        _input_grad_into(grad_in, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
    return (grad_in, sum_dy_xhat.sum(0).to(weight.dtype) if needs[1] else None,
            sum_dy.sum(0).to(weight.dtype) if needs[2] else None)


def _local_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of x on the CPU, accumulated in fp32 (fp64 for fp64): the BN
    kernel's one pass (given fp32 stand-ins for the running statistics, it accumulates bf16 in fp32)."""
    acc = _accumulator(x.dtype)
    if x.dtype == acc:
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    stand_in = x.new_zeros(x.shape[1], dtype=acc)  # momentum 0: left as they are
    return torch.batch_norm_update_stats(x, stand_in, stand_in, 0.0)


def _combine(mean: torch.Tensor, variance: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's (mean, biased variance) from its ranks', each over the same number of elements (collective:
    all-gather of 2C numbers in group). Chan et al.'s exact rule for equal counts: the mean of the means, and
    the mean of the variances plus the variance of the means."""
    mine = torch.cat([mean, variance])
    gathered = mine.new_empty(torch_dist.get_world_size(group) * mine.numel())  # flat: gloo takes no stacked form
    all_gather_single(gathered, mine, group=group)
    gathered = gathered.view(-1, mine.numel())
    means, variances = gathered[:, :mean.numel()], gathered[:, mean.numel():]
    group_mean = means.mean(0)
    return group_mean, variances.mean(0) + (means - group_mean).pow(2).mean(0)


def _sync_forward_cuda(x, weight, bias, running_mean, running_var, momentum: float, eps: float, count: int, group):
    """nn.SyncBatchNorm's forward kernels with the counts known here; updates the running statistics.
    Collective: all-gather of 2C numbers in group."""
    ranks = torch_dist.get_world_size(group)
    mean, invstd = torch.batch_norm_stats(x, eps)  # this rank's, one pass (fp32 for bf16)
    gathered = mean.new_empty(ranks * 2 * mean.numel())
    all_gather_single(gathered, torch.cat([mean, invstd]), group=group)
    gathered = gathered.view(ranks, -1)
    counts = torch.full((ranks,), count, dtype=running_mean.dtype, device=x.device)  # a fill: no copy from the host
    mean, invstd = torch.batch_norm_gather_stats_with_counts(
        x, gathered[:, :mean.numel()], gathered[:, mean.numel():], running_mean, running_var, momentum, eps, counts)
    return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps), mean, invstd


def _sync_backward_cuda(dy, x, weight, mean, invstd, count: int, group, needs):
    """nn.SyncBatchNorm's backward kernels. Collective: all-reduce of 2C numbers in group (if x needs a gradient)."""
    sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, *needs)
    grad_in = None
    if needs[0]:
        sums = torch.cat([sum_dy, sum_dy_xmu])
        torch_dist.all_reduce(sums, group=group)
        counts = torch.full((torch_dist.get_world_size(group),), count, dtype=torch.int32, device=x.device)
        grad_in = torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight.to(mean.dtype), sums[:mean.numel()],
                                                  sums[mean.numel():], counts)
    return grad_in, grad_weight, grad_bias


class GroupBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over groups of the batch (and across ranks), optionally + ReLU.

    The affine gradients are this rank's part (DDP's all-reduce adds the parts)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu, per_rank, group):
        if x.shape[0] % per_rank:
            raise ValueError(f"a batch of {x.shape[0]} images does not split into {per_rank} BN groups "
                             "(train.bn_batch)")
        count = x.shape[0] // per_rank * x.shape[2:].numel()  # elements per channel of one group on this rank
        ranks = 1 if group is None else torch_dist.get_world_size(group)
        if count * ranks < 2:  # as nn.BatchNorm2d refuses it: the kernel's unbiased variance would divide by 0
            raise ValueError(f"a BN group of {x.shape[0] // per_rank * ranks} image(s) has 1 value per channel at "
                             f"this {'x'.join(map(str, x.shape[2:]))} layer, so no variance; use a larger "
                             "train.bn_batch")
        if group is None:
            out, mean, invstd = _ghost_forward(x, weight, bias, running_mean, running_var, momentum, per_rank, eps)
        elif x.is_cuda:
            out, mean, invstd = _sync_forward_cuda(x, weight, bias, running_mean, running_var, momentum, eps, count,
                                                   group)
        else:
            mean, variance = _combine(*_local_stats(x), group)
            out, _, _ = torch.native_batch_norm(x, weight, bias, mean, variance, False, 0.0, eps)
            _update_running(running_mean, running_var, momentum, mean, variance, count * ranks)
            invstd = torch.rsqrt(variance + eps)
        positive = out.relu_().bool() if relu else None
        ctx.save_for_backward(x, pack_bits(positive) if relu else None, weight, mean, invstd)
        ctx.mask_layout = (positive.shape, positive.stride()) if relu else None
        ctx.group, ctx.count, ctx.ranks, ctx.eps = group, count, ranks, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, weight, mean, invstd = ctx.saved_tensors
        if ctx.mask_layout is not None:
            grad_out = apply_mask(grad_out, mask, *ctx.mask_layout)
        needs = ctx.needs_input_grad[:3]
        if ctx.group is None:
            grads = _ghost_backward(grad_out, x, weight, mean, invstd, ctx.eps, ctx.count, needs)
        elif x.is_cuda:
            grads = _sync_backward_cuda(grad_out, x, weight, mean, invstd, ctx.count, ctx.group, needs)
        else:
            grads = _sync_backward_cpu(grad_out, x, weight, mean, invstd, ctx.eps, ctx.count * ctx.ranks, ctx.group,
                                       needs)
        return *grads, None, None, None, None, None, None, None


def _sync_backward_cpu(dy, x, weight, mean, invstd, eps: float, count: int, group, needs):
    """A ghost group's backward with the group's sums over count elements. Collective: all-reduce of 2C numbers
    in group (if x needs a gradient), started before the dy term of the input gradient and awaited after it."""
    sum_dy, sum_dy_xhat = _sums(dy, x, mean, invstd, weight, eps)  # this rank's part
    grad_in = None
    if needs[0]:
        sums = torch.cat([sum_dy, sum_dy_xhat])
        travelling = torch_dist.all_reduce(sums, group=group, async_op=True)
        grad_in = torch.empty_like(x)
        scale = _scale(weight, invstd[None])
        _dy_term_into(grad_in, dy, scale)
        travelling.wait()  # sync point: the group's sums
        _add_x_terms(grad_in, x, *_x_terms(mean[None], invstd[None], scale, sums[None, :mean.numel()],
                                           sums[None, mean.numel():], count))
    return (grad_in, sum_dy_xhat.to(weight.dtype) if needs[1] else None,
            sum_dy.to(weight.dtype) if needs[2] else None)


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
