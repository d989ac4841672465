"""llama.cpp (GGML) block types as stateless encode/decode pairs between llmquant's quantized tensors
(integer codes, per-block scale ``d``, optional float offset ``m``) and the bytes GGUF stores.

Every type here holds blocks of 32 values along a row with an fp16 ``d`` (and an fp16 ``m`` for the "_1"
types) and computes, in float32::

    Q8_0  x = c * d            c int8                  34 bytes / 32 values
    Q4_0  x = (u - 8) * d      u 4-bit, c = u - 8      18 bytes
    Q5_0  x = (u - 16) * d     u 5-bit (high bits in qh), c = u - 16   22 bytes
    Q4_1  x = u * d + m        u 4-bit                 20 bytes
    Q5_1  x = u * d + m        u 5-bit                 24 bytes

(ggml-quants.c, ``dequantize_row_*``; the ``gguf`` package's ``gguf.quants`` does the same in numpy.)
The k-quant super-block types Q2_K .. Q6_K (256 values, two-level scales) are listed here too and encoded
by :mod:`llmquant.io.ggml_kquants`. :func:`exact_blocks` finds the smallest type whose values equal a QuantLinear's ``dequantize_weight()``
bit for bit and proves it by decoding with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..schemes import gguf_bytes, resolve_scheme
from . import ggml_kquants as kq

QK = 32  # values per block of the Q*_0 / Q*_1 / Q8_0 types
QK_K = kq.QK_K  # values per k-quant super-block


@dataclass(frozen=True)
class BlockType:
    name: str  # GGMLQuantizationType member name
    bits: int
    offset: bool  # True for x = u * d + m ("_1" types), False for x = c * d
    code_min: int  # smallest signed code c (for offset types: 0)
    code_max: int
    preset: str  # the llmquant scheme preset that quantizes onto this grid
    bytes_per_block: int
    block_values: int = QK  # values per block (256 for the k-quants)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_per_block / self.block_values

    @property
    def kquant(self) -> bool:
        return self.block_values == QK_K


def _bt(name: str, bits: int, offset: bool, code_min: int, code_max: int) -> BlockType:
    """The block type of preset ``gguf:<name>``; its bytes per block from the one definition of a GGUF
    tensor's size, :func:`llmquant.schemes.gguf_bytes`."""
    preset = f"gguf:{name}"
    scheme = resolve_scheme(preset)
    values = scheme.super_group or QK
    return BlockType(name, bits, offset, code_min, code_max, preset, gguf_bytes(scheme, 1, values), values)


#: Ordered by size: :func:`exact_blocks` takes the first that represents a layer exactly.
BLOCK_TYPES: tuple[BlockType, ...] = (
    _bt("Q2_K", 2, True, 0, 3),
    _bt("Q3_K", 3, False, -4, 3),
    _bt("Q4_0", 4, False, -8, 7),
    _bt("Q4_K", 4, True, 0, 15),
    _bt("Q4_1", 4, True, 0, 15),
    _bt("Q5_0", 5, False, -16, 15),
    _bt("Q5_K", 5, True, 0, 31),
    _bt("Q5_1", 5, True, 0, 31),
    _bt("Q6_K", 6, False, -32, 31),
    _bt("Q8_0", 8, False, -128, 127),
)
BY_NAME = {b.name: b for b in BLOCK_TYPES}
#: Types a tensor may be re-quantized to with the ``gguf`` package's own (llama.cpp reference) quantizers.
REQUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32")


def ggml_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8).reshape(-1, 2)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes: byte j holds value j (low) and value j + 16 (high)."""
    u = u.astype(np.uint8)
    return (u[:, :16] & 0x0F) | ((u[:, 16:] & 0x0F) << 4)


def _qh(u: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit values -> (n, 4) bytes: bit j of a little-endian uint32 is bit 4 of value j."""
    return np.packbits((u >> 4).astype(np.uint8) & 1, axis=-1, bitorder="little")


def encode(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None, bt: BlockType) -> np.ndarray:
    """Bytes (rows, K/32 * bytes_per_block) of a 32-value block type from codes (rows, K) — signed ``c`` for Q*_0, unsigned ``u``
    for Q*_1 — and per-block fp16 ``d`` (rows, K/32) and ``m`` (Q*_1 only)."""
    rows, k = codes.shape
    c = codes.reshape(-1, QK).astype(np.int32)
    parts = [_f16_bytes(d)]
    if bt.offset:
        parts.append(_f16_bytes(m))
    if bt.name == "Q8_0":
        parts.append(c.astype(np.int8).view(np.uint8))
    else:
        u = c - bt.code_min if not bt.offset else c  # Q4_0 / Q5_0 store c + 8 / c + 16
        if bt.bits == 5:
            parts.append(_qh(u))
        parts.append(_nibbles(u))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def decode(raw: np.ndarray, bt: BlockType, k: int):
    """Inverse of :func:`encode`: codes (rows, K) int16, d (rows, K/32) fp16, m or None. For the k-quants:
    codes, the float32 group scales ``d * sc`` and minima ``-(dmin * mc)`` (or None), (rows, K / group)."""
    rows = raw.shape[0]
    if bt.kquant:
        kt = kq.KTYPES[bt.name]
        u, d, sc, dmin, mc = kq.decode(raw, kt)
        scale = (d[:, None] * sc.astype(np.float32)).reshape(rows, -1)
        m = None if dmin is None else -(dmin[:, None] * mc.astype(np.float32)).reshape(rows, -1)
        return (u - kt.code_offset).astype(np.int16).reshape(rows, k), scale, m
    b = raw.reshape(-1, bt.bytes_per_block)
    d = b[:, 0:2].copy().view(np.float16).reshape(rows, -1)
    pos = 2
    m = None
    if bt.offset:
        m = b[:, 2:4].copy().view(np.float16).reshape(rows, -1)
        pos = 4
    if bt.name == "Q8_0":
        c = b[:, pos:].copy().view(np.int8).astype(np.int16)
    else:
        qh = None
        if bt.bits == 5:
            qh = np.unpackbits(b[:, pos : pos + 4], axis=-1, bitorder="little").astype(np.int16)
            pos += 4
        qs = b[:, pos : pos + 16]
        u = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int16)
        if qh is not None:
            u = u | (qh << 4)
        c = u if bt.offset else u + bt.code_min
    return c.reshape(rows, k), d, m


def dequantize_bytes(raw: np.ndarray, name: str) -> np.ndarray:
    """The ``gguf`` package's own dequantizer (float32, rows x K)."""
    from gguf import quants

    return quants.dequantize(raw, ggml_type(name))


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.half()).all()) and torch.equal(t.float().half().float(), t.float())


def candidate_blocks(module, bt: BlockType) -> np.ndarray | None:
    """The bytes that would hold ``module``'s weights in ``bt`` if its grid maps onto that type's grid
    (group size 32, fp16-representable parameters, codes in range), else None. Not yet verified."""
    if bt.kquant:
        return _kquant_candidate(module, kq.KTYPES[bt.name])
    s = module.scheme
    k = module.in_features
    if s.granularity != "group" or s.group_size != QK or k % QK:
        return None
    scale = module.scale.float()
    if not _fp16_exact(scale):
        return None
    q = module.codes().to(torch.int32)
    z = module.zero_point()
    if bt.offset:
        if s.symmetric:  # x = q * s = (q - qmin) * s + qmin * s
            u, m = q - s.qmin, scale * s.qmin
        elif s.zero_point == "min":  # x = (q - qmin) * s + m
            u, m = q - s.qmin, z.float()
        else:  # x = (q - z) * s = q * s + (-z * s)
            u, m = q, -z.float() * scale
        if not _fp16_exact(m):
            return None
        if int(u.min()) < 0 or int(u.max()) > bt.code_max:
            return None
        return encode(u.numpy(), scale.numpy(), m.numpy(), bt)
    if not s.symmetric and s.zero_point != "int":
        return None  # a float offset has no place in x = c * d
    c = q if s.symmetric else q - z.to(torch.int32).repeat_interleave(QK, dim=1)[:, :k]
    if int(c.min()) < bt.code_min or int(c.max()) > bt.code_max:
        return None
    return encode(c.numpy(), scale.numpy(), None, bt)


def _kquant_candidate(module, kt: kq.KType) -> np.ndarray | None:
    """Super-block bytes for ``module`` if its codes and group scales lie on ``kt``'s grid, else None."""
    s = module.scheme
    k, rows = module.in_features, module.out_features
    if s.granularity != "group" or s.group_size != kt.group or k % QK_K or s.bits != kt.bits:
        return None
    if kt.offset != (not s.symmetric) or (kt.offset and s.zero_point != "min") or s.qmin != -kt.code_offset:
        return None
    u = (module.codes().to(torch.int32) - s.qmin).numpy().reshape(-1, QK_K)
    split = kq.split_scales(module.scale.float().numpy().reshape(-1, kt.n_sub), *kt.sc_range)
    if split is None:
        return None
    d, sc = split
    dmin = mc = None
    if kt.offset:
        minima = kq.split_scales(-module.zero_point().float().numpy().reshape(-1, kt.n_sub), *kt.sc_range)
        if minima is None:
            return None
        dmin, mc = minima
    return kq.encode(u, d, sc, dmin, mc, kt).reshape(rows, -1)


def exact_blocks(module, types: tuple[BlockType, ...] = BLOCK_TYPES) -> tuple[BlockType, np.ndarray] | None:
    """(type, bytes) of the smallest block type whose decoded values equal ``module.dequantize_weight()``
    bit for bit (checked with ``gguf.quants.dequantize``), or None if none does."""
    ref = None
    for bt in types:
        raw = candidate_blocks(module, bt)
        if raw is None:
            continue
        if ref is None:
            ref = module.dequantize_weight(torch.float32).numpy()
        got = dequantize_bytes(raw, bt.name).reshape(ref.shape)
        if np.array_equal(got.view(np.uint32), ref.view(np.uint32)):
            return bt, raw
    return None


def module_from_blocks(raw: np.ndarray, name: str, k: int, bias: torch.Tensor | None = None):
    """A QuantLinear holding the blocks' values exactly (on its type's preset scheme)."""
    from ..modules import QuantLinear

    bt = BY_NAME[name]
    scheme = resolve_scheme(bt.preset)
    c, d, m = decode(raw, bt, k)
    q = torch.from_numpy(c.astype(np.int16))
    if scheme.restricted_range and int(q.min()) < scheme.qmin:  # a Q8_0 block using -128
        scheme = type(scheme)(**{**scheme.to_dict(), "restricted_range": False})
    return QuantLinear.from_quantized(
        q, torch.from_numpy(d.copy()), None if m is None else torch.from_numpy(m.copy()), scheme, bias=bias
    )
