"""Lossless dense bit packing of unsigned integer codes, 1..8 bits per value.

Values are packed little-endian into a flat byte stream: every 8 values take exactly ``bits`` bytes,
so int4 stores two values per byte, int3 eight values in three bytes and int2 four per byte. The
logical shape is kept by the caller; ``unpack(pack(u, b), b, n) == u`` exactly for any ``n``.
"""

from __future__ import annotations

import torch

from .schemes.formats import packed_numel  # noqa: F401  (the byte count of packed codes lives with the formats)


def _check(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values in [0, 2^bits)) into a flat uint8 tensor."""
    _check(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    n = flat.numel()
    pad = (-n) % 8
    v = flat.to(torch.int64)
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    v = v.reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=v.device) * bits
    word = (v << shifts).sum(dim=1)  # up to 56 bits per 8 values
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=v.device) * 8
    out = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_numel(n, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as uint8."""
    _check(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {packed.dtype}")
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} values of {bits} bits")
    if bits == 8:
        return packed.reshape(-1)[:numel].clone()
    b = packed.reshape(-1).to(torch.int64)
    pad = (-b.numel()) % bits
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    b = b.reshape(-1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=b.device) * 8
    word = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64, device=b.device) * bits
    vals = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(-1)[:numel].to(torch.uint8)
