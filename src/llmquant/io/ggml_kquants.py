"""llama.cpp k-quant super-blocks (Q2_K .. Q6_K, 256 values each) as stateless encode/decode pairs between
llmquant's two-level scales (:mod:`llmquant.schemes.kquant`) and the bytes GGUF stores.

Layouts (ggml-common.h; one super-block, fields in file order)::

    Q2_K  84 B   scales[16] (sc | mc << 4), qs[64] (2-bit), d, dmin
    Q3_K 110 B   hmask[32] (bit 2 of u = c + 4), qs[64] (low 2 bits of u), scales[12] (6-bit sc + 32), d
    Q4_K 144 B   d, dmin, scales[12] (6-bit sc and mc), qs[128] (4-bit)
    Q5_K 176 B   d, dmin, scales[12], qh[32] (bit 4), qs[128] (low 4 bits)
    Q6_K 210 B   ql[128] (low 4 bits of u = c + 32), qh[64] (high 2 bits), scales[16] (int8 sc), d

Bit fields are interleaved the way ``dequantize_row_q*_K`` walks them: a field of ``w`` bits over ``A``
chunks of ``B`` bytes, shifted by ``0, w, 2w, ...`` holds values in the order (chunk, shift, byte) — see
:func:`_put` / :func:`_get`. The group scales are recovered from a QuantLinear's float32 ``d * sc`` by
:func:`split_scales`, which finds an fp16 ``d`` that makes every ``sc`` an integer in range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256


@dataclass(frozen=True)
class KType:
    name: str
    bits: int
    group: int  # values per group scale
    sub_bits: int  # bits of sc (and mc)
    offset: bool  # float minima (x = (d sc) q - dmin mc)
    bytes_per_block: int

    @property
    def n_sub(self) -> int:
        return QK_K // self.group

    @property
    def sc_range(self) -> tuple[int, int]:
        b = self.sub_bits
        return (0, 2**b - 1) if self.offset else (-(2 ** (b - 1)), 2 ** (b - 1) - 1)

    @property
    def code_offset(self) -> int:
        """Stored unsigned value minus the signed code (0 for the minimum types)."""
        return 0 if self.offset else 2 ** (self.bits - 1)


KTYPES = {t.name: t for t in (
    KType("Q2_K", 2, 16, 4, True, 84),
    KType("Q3_K", 3, 16, 6, False, 110),
    KType("Q4_K", 4, 32, 6, True, 144),
    KType("Q5_K", 5, 32, 6, True, 176),
    KType("Q6_K", 6, 16, 8, False, 210),
)}


def _put(v: np.ndarray, chunks: int, width: int, nshift: int) -> np.ndarray:
    """(n, chunks * nshift * B) values of ``width`` bits -> (n, chunks * B) bytes; value (a, s, b) sits in
    byte (a, b) at bit ``s * width``."""
    n = v.shape[0]
    v = v.astype(np.uint8).reshape(n, chunks, nshift, -1) & np.uint8((1 << width) - 1)
    out = np.zeros((n, chunks, v.shape[-1]), dtype=np.uint8)
    for s in range(nshift):
        out |= v[:, :, s, :] << np.uint8(s * width)
    return out.reshape(n, -1)


def _get(raw: np.ndarray, chunks: int, width: int, nshift: int) -> np.ndarray:
    """Inverse of :func:`_put`: (n, chunks * B) bytes -> (n, chunks * nshift * B) values (int32)."""
    n = raw.shape[0]
    r = raw.reshape(n, chunks, 1, -1)
    shifts = (np.arange(nshift, dtype=np.uint8) * width).reshape(1, 1, nshift, 1)
    return ((r >> shifts) & np.uint8((1 << width) - 1)).reshape(n, -1).astype(np.int32)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_scale_min_k4(sc: np.ndarray, mc: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 six-bit scales and minima into 12 bytes (ggml's ``get_scale_min_k4`` inverted)."""
    sc, mc = sc.astype(np.uint8), mc.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mc[:, :4] & 63) | ((mc[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mc[:, 4:] & 15) << 4)
    return out


def _unpack_scale_min_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = b.astype(np.int32)
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], axis=1)
    mc = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mc


def encode(u: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray | None, mc: np.ndarray | None,
           kt: KType) -> np.ndarray:
    """Super-blocks (n, bytes_per_block) from unsigned stored values ``u`` (n, 256) (``q``, or ``c +
    code_offset``), fp16-exact ``d`` (n,), integer ``sc`` (n, n_sub), and for minimum types ``dmin``, ``mc``."""
    n = u.shape[0]
    u = u.astype(np.uint8)
    if kt.name == "Q2_K":
        parts = [_put(np.concatenate([sc, mc], 1), 1, 4, 2), _put(u, 2, 2, 4), _f16(d), _f16(dmin)]
    elif kt.name == "Q3_K":
        s6 = (sc + 32).astype(np.uint8)
        scales = np.concatenate([_put(s6 & 15, 1, 4, 2), _put(s6 >> 4, 1, 2, 4)], 1)
        parts = [_put(u >> 2, 1, 1, 8), _put(u & 3, 2, 2, 4), scales, _f16(d)]
    elif kt.name in ("Q4_K", "Q5_K"):
        parts = [_f16(d), _f16(dmin), _pack_scale_min_k4(sc, mc)]
        if kt.name == "Q5_K":
            parts.append(_put(u >> 4, 1, 1, 8))
        parts.append(_put(u & 15, 4, 4, 2))
    else:  # Q6_K
        parts = [_put(u & 15, 2, 4, 2), _put(u >> 4, 2, 2, 4), sc.astype(np.int8).view(np.uint8), _f16(d)]
    out = np.concatenate(parts, axis=1)
    assert out.shape == (n, kt.bytes_per_block)
    return out


def decode(raw: np.ndarray, kt: KType):
    """Inverse of :func:`encode`: ``(u, d, sc, dmin, mc)`` with float32 ``d`` / ``dmin`` (None for the
    symmetric types) and int32 ``u``, ``sc``, ``mc``."""
    b = raw.reshape(-1, kt.bytes_per_block)

    def f16(i):
        return b[:, i:i + 2].copy().view(np.float16).astype(np.float32).reshape(-1)

    dmin = mc = None
    if kt.name == "Q2_K":
        s = _get(b[:, 0:16], 1, 4, 2)
        sc, mc = s[:, :16], s[:, 16:]
        u = _get(b[:, 16:80], 2, 2, 4)
        d, dmin = f16(80), f16(82)
    elif kt.name == "Q3_K":
        u = _get(b[:, 32:96], 2, 2, 4) | (_get(b[:, 0:32], 1, 1, 8) << 2)
        sc = (_get(b[:, 96:104], 1, 4, 2) | (_get(b[:, 104:108], 1, 2, 4) << 4)) - 32
        d = f16(108)
    elif kt.name in ("Q4_K", "Q5_K"):
        d, dmin = f16(0), f16(2)
        sc, mc = _unpack_scale_min_k4(b[:, 4:16])
        if kt.name == "Q5_K":
            u = _get(b[:, 48:176], 4, 4, 2) | (_get(b[:, 16:48], 1, 1, 8) << 4)
        else:
            u = _get(b[:, 16:144], 4, 4, 2)
    else:  # Q6_K
        u = _get(b[:, 0:128], 2, 4, 2) | (_get(b[:, 128:192], 2, 2, 4) << 4)
        sc = b[:, 192:208].view(np.int8).astype(np.int32)
        d = f16(208)
    return u, d, sc, dmin, mc


def split_scales(s: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(d, sc)`` with fp16-exact float32 ``d`` (n,) and integers ``sc`` (n, k) in [lo, hi] such that
    ``d * sc == s`` bit for bit in float32, for float32 group scales ``s`` (n, k); None if some row has no
    such ``d``. Tries ``d = s_e / c`` for the row's largest-magnitude scale ``s_e`` and every nonzero ``c``
    in range (``s_e = d * c`` exactly, so ``s_e / c`` is ``d`` itself)."""
    s = s.astype(np.float32)
    n = s.shape[0]
    d = np.zeros(n, dtype=np.float32)
    sc = np.zeros(s.shape, dtype=np.int32)
    todo = np.ones(n, dtype=bool)
    zero_rows = ~np.any(s != 0, axis=1)
    d[zero_rows], todo[zero_rows] = 0.0, False
    ext = s[np.arange(n), np.abs(s).argmax(axis=1)]
    cands = [c for c in range(hi, lo - 1, -1) if c] if lo < 0 else list(range(hi, 0, -1))
    if lo < 0:  # most likely first: the extreme on the grid's end (llama.cpp's d = s_e / lo)
        cands = [lo] + [c for c in cands if c != lo]
    for c in cands:
        if not todo.any():
            break
        idx = np.nonzero(todo)[0]
        dc = (ext[idx] / np.float32(c)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = s[idx] / dc[:, None]
        ok = np.isfinite(dc) & (dc != 0) & (dc.astype(np.float16).astype(np.float32) == dc)
        qr = np.rint(np.where(np.isfinite(q), q, 0)).astype(np.int64)
        ok &= np.all((qr >= lo) & (qr <= hi), axis=1)
        ok &= np.all((dc[:, None] * qr.astype(np.float32)).astype(np.float32).view(np.uint32)
                     == s[idx].view(np.uint32), axis=1)
        hit = idx[ok]
        d[hit], sc[hit], todo[hit] = dc[ok], qr[ok], False
    return None if todo.any() else (d, sc)
