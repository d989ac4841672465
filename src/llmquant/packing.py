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


_CHUNK = 1 << 23  # codes per step: 64 MB of int64 temporaries


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values in [0, 2^bits)) into a flat uint8 tensor."""
    _check(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    n = flat.numel()
    if bits in (1, 2, 4):  # whole values per byte: shifts and ors on bytes (3-10x faster than 64-bit words)
        per = 8 // bits
        v = flat.to(torch.uint8)
        pad = (-n) % per
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        v = v.reshape(-1, per)
        out = v[:, 0].clone()
        for j in range(1, per):
            out |= v[:, j] << (j * bits)
        return out[: packed_numel(n, bits)]
    out = torch.empty(packed_numel(n, bits), dtype=torch.uint8, device=flat.device)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    for start in range(0, n, _CHUNK):  # int64 temporaries for one chunk, not for the whole weight
        v = flat[start:start + _CHUNK].to(torch.int64)
        pad = (-v.numel()) % 8  # only the last chunk (chunks are a multiple of 8 codes)
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        word = (v.reshape(-1, 8) << shifts).sum(dim=1)  # up to 56 bits per 8 values
        chunk = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
        o = start // 8 * bits
        out[o:o + chunk.numel()] = chunk[: out.numel() - o]
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as uint8."""
    _check(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {packed.dtype}")
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} values of {bits} bits")
    if bits == 8:
        return packed.reshape(-1)[:numel].clone()
    flat = packed.reshape(-1)
    if bits in (1, 2, 4):
        per, mask = 8 // bits, (1 << bits) - 1
        out = torch.empty(flat.numel(), per, dtype=torch.uint8, device=packed.device)
        for j in range(per):
            torch.bitwise_and(flat >> (j * bits), mask, out=out[:, j])
        return out.reshape(-1)[:numel].clone() if out.numel() != numel else out.reshape(-1)
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    step = _CHUNK // 8 * bits  # bytes holding one chunk of codes
    for o in range(0, flat.numel(), step):
        b = flat[o:o + step].to(torch.int64)
        pad = (-b.numel()) % bits
        if pad:
            b = torch.cat([b, b.new_zeros(pad)])
        word = (b.reshape(-1, bits) << byte_shifts).sum(dim=1)
        vals = ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
        start = o // bits * 8
        take = min(vals.numel(), numel - start)
        out[start:start + take] = vals[:take].to(torch.uint8)
    return out
