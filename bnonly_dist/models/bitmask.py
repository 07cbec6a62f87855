"""Masks packed 1 bit per element: what the lean autograd path keeps of a ReLU (8x less than bool)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Bit tricks on int64 words of 8 mask bytes (little-endian): one multiply gathers the low
# bit of each byte into the top byte; the reverse spreads bit k back into byte k.
_GATHER = 0x0102040810204080
_REPEAT = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # byte k keeps bit k (as a signed int64)
_SEVENS = 0x7F7F7F7F7F7F7F7F  # a non-zero byte + 0x7F sets that byte's top bit


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of any dense layout as uint8, 8 elements per byte, in memory order."""
    flat = mask.as_strided((mask.numel(),), (1,)).view(torch.uint8)
    if flat.numel() % 8:
        flat = F.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(torch.int64) * _GATHER).view(torch.uint8)[7::8].clone()  # each word's top byte


def unpack_bits(packed: torch.Tensor, shape: torch.Size, stride: tuple[int, ...]) -> torch.Tensor:
    """The mask pack_bits took, as uint8 0/1 (multiplies faster than bool) with its shape and strides."""
    words = packed.to(torch.int64).mul_(_REPEAT).bitwise_and_(_SELECT).add_(_SEVENS)
    flat = words.bitwise_right_shift_(7).bitwise_and_(_REPEAT).view(torch.uint8)
    return flat[:shape.numel()].as_strided(shape, stride)


def apply_mask(grad: torch.Tensor, packed: torch.Tensor, shape: torch.Size, stride: tuple[int, ...]) -> torch.Tensor:
    """grad where the packed mask is set, 0 elsewhere, in the forward's memory layout.

    The layout matters: a gradient arriving in another layout (NCHW from the average pool
    under channels_last) would otherwise stay in it down the residual path, and BN's
    backward on a gradient and input of different layouts ran 2-7x slower on the CPU."""
    mask = unpack_bits(packed, shape, stride)
    return torch.mul(grad, mask, out=torch.empty_like(mask, dtype=grad.dtype))
