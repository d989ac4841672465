"""``packed_q8act``: decode with the activations rounded to int8 per block of 32 and integer dot products
against llmquant's packed int4 / int8 codes (C++, AVX512-VNNI or AVX2; ``csrc/qgemm_q8act.cpp``).

This is what llama.cpp's CPU matmul computes for Q4_0 / Q8_0 weights: each row of ``x`` rounded to int8 in
blocks of 32 values with ``d = max|x| / 127`` (llmquant's ``gguf:Q8_0-act`` activation scheme: ``d``
rounded to fp16, ``round(x / d)`` half to even), int32 dot products per block, the block and weight-group
scales applied in fp32. It reads the same packed codes as ``packed_avx2``, with fewer bytes per group where
the format allows (no offsets for symmetric schemes, whose integer base ``-qmin`` goes into the int32 sums;
fp16 scales where the stored ones are fp16: 2 bytes per 32 weights for Q4_0 / Q8_0 instead of 8), and
multiplies bytes by bytes (``vpdpbusd`` / ``vpmaddubsw``) instead of 16-bit products.

Numerics: for a weight-only module this changes the model's numerics (activations are rounded to about 2-3
significant digits per block), so the kernel is opt-in: ``set_kernel(model, "packed_q8act")``,
``LLMQUANT_KERNEL=packed_q8act`` or ``llmquant generate --kernel packed_q8act``; the automatic choice never
takes it for such a module. For a module whose activation scheme is ``gguf:Q8_0-act`` (what
:func:`llmquant.eval.llama_cpp.emulate_llama_cpp` gives Q4_0 / Q8_0 layers) it computes exactly the
module's numerics, up to fp32 summation order.

Prefill (``packed_cpu.LARGE_M`` rows of ``x`` or more) on AVX512-VNNI (any groups: 32 values or more, or 16
at 8 bits, as Q6_K's, each half block then with its own scale), runs the int8 kernel too (its many-row path: tiles of 8 output rows, one per int32 lane, the same block
sums), as llama.cpp's prefill does: the int8 activation rounding then applies to the prompt as well
(``LLMQUANT_Q8ACT_PREFILL=fp32``, read at each call, keeps it off). Otherwise prefill runs ``packed_avx2``'s
prefill path (fbgemm's fp16-weight GEMM, or a dequantized fp32 GEMM) on the input as the module's
activation scheme sees it (rounded to int8 blocks for ``gguf:Q8_0-act`` modules, as is for weight-only ones).

On AVX512-VNNI the kernel reads the codes in a tiled layout made when the model
is prepared (8 output rows per tile, each block's codes already in the int32 lanes, the 8 rows' scales
together): the same sums as the row layout, fewer instructions per block for decode and prefill alike, at the
cost of a copy of the codes in memory (half a byte per weight at 4 bits, one at 8). Codes widened to a byte from
2-6 bits (Q6_K, Q5_K, Q3_K, ...) are tiled at 6 bits (a low-nibble vector and two bits each, unpacked in
registers): three quarters of the bytes to read. ``LLMQUANT_Q8ACT_LAYOUT`` (read when a module is prepared):
``tiled`` (default), ``tiled8`` (widened codes tiled at 8 bits) or ``rows`` (the row layout only).

The instruction set is the best the CPU has (VNNI's ``vpdpbusd`` when AVX512-VNNI is there, else AVX2's
``vpmaddubsw``); ``LLMQUANT_Q8ACT_ISA=avx2`` (read when a module is prepared) forces the AVX2 path.

Supported: what ``packed_avx2`` supports (CPU, 4 or 8 bits, ``in_features`` a multiple of 32, groups of 32
values or more, or of 16 with 8-bit or widened codes), weight-only or with the ``gguf:Q8_0-act`` activation scheme.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from . import native
from .base import register
from .packed_cpu import LARGE_M, PackedAVX2, PackedState, can_fuse, format_supported, run_fused, stacked_bias
from .reference import fake_quant_input

#: ``LLMQUANT_Q8ACT_ISA`` values: the instruction set of the int8 dot products (-1: the best available).
ISAS = {"auto": -1, "avx2": 0, "vnni": 1}


def q8_0_activation():
    """The activation scheme this kernel applies (llama.cpp's Q8_0 blocks; one definition, in the presets)."""
    from ..schemes import PRESETS

    return PRESETS["gguf:Q8_0-act"]


def _env_choice(name: str, choices, default: str) -> str:
    """The value of environment variable ``name`` (lower case), one of ``choices``."""
    value = os.environ.get(name, default).lower()
    if value not in choices:
        from ..errors import LLMQuantError

        raise LLMQuantError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _tiles(isa: int) -> bool:
    """Whether the VNNI path with 8-row tiles applies: ``isa`` (-1: the best) resolves to VNNI (every group
    size the kernel reads: multiples of 32, and 16 at 8 bits)."""
    return (native.load().q8_best_isa() if isa == -1 else isa) == 1


def int8_prefill(states) -> bool:
    """Whether a many-row call of these prepared modules runs the int8 kernel (see the module docstring)."""
    mode = _env_choice("LLMQUANT_Q8ACT_PREFILL", ("int8", "fp32"), "int8")
    return mode == "int8" and _tiles(states[0].isa)


def isa_from_env() -> int:
    return ISAS[_env_choice("LLMQUANT_Q8ACT_ISA", ISAS, "auto")]


@dataclass(frozen=True, eq=False)
class Q8State(PackedState):
    """:class:`~llmquant.kernels.packed_cpu.PackedState` plus what the int8 kernel reads: the scales in fp16
    where that is exact (GGUF's are fp16), and for symmetric schemes no offsets but the integer base ``-qmin``
    of ``W = (u + qmin) * scale`` (so fewer bytes per group are read); the instruction set chosen."""

    qscale: torch.Tensor | None = None  # (out_features, groups) fp16 or fp32
    qoffsets: torch.Tensor | None = None  # the fp32 offsets, or an empty tensor for a symmetric scheme
    qbase: int = 0  # -qmin for a symmetric scheme
    isa: int = -1
    # the codes, scales and offsets in q8gemm's tiled layout (8 rows per tile, each block's codes in lanes;
    # VNNI; ``LLMQUANT_Q8ACT_LAYOUT=rows`` keeps the row layout), and the tiles' bits (6 for codes widened from
    # 2-6 bits): (codes, scales, offsets, bits)
    tiled: tuple | None = None


def q8gemm_args(states: list[Q8State]) -> tuple:
    """The extension's ``q8gemm`` arguments after ``x``: codes, scales, offsets, bits, group size, isa, bases,
    and the rows of each weight when they are in the tiled layout (all of them tiled; else an empty list)."""
    s0 = states[0]
    bits = s0.bits
    if all(st.tiled is not None for st in states) and len({st.tiled[3] for st in states}) == 1:
        codes, scales, offsets, tbits = (list(t) for t in zip(*(st.tiled for st in states)))
        rows, bits = [st.out_features for st in states], tbits[0]
    else:
        codes, scales, offsets = [st.codes for st in states], [st.qscale for st in states], [st.qoffsets for st in states]
        rows = []
    return codes, scales, offsets, bits, s0.group_size, s0.isa, [st.qbase for st in states], rows


def _tile_groups(t: torch.Tensor) -> torch.Tensor:
    """(rows, groups) per-group values to the tiled layout's order (rows padded to 8; per tile, each group's
    8 values together), shaped (padded rows, groups)."""
    if t.numel() == 0:
        return t
    rows, g = t.shape
    pad = -rows % 8
    t = torch.cat([t, t.new_zeros(pad, g)]) if pad else t
    return t.reshape(-1, 8, g).transpose(1, 2).contiguous().reshape(-1, g)


#: ``LLMQUANT_Q8ACT_LAYOUT`` values: ``tiled`` (codes widened from 2-6 bits tiled at 6 bits), ``tiled8`` (at 8
#: bits, as stored in memory), ``rows`` (no tiled copy).
LAYOUTS = ("tiled", "tiled8", "rows")


def _tiled(st: PackedState, qscale, qoffsets, isa: int) -> tuple | None:
    layout = _env_choice("LLMQUANT_Q8ACT_LAYOUT", LAYOUTS, "tiled")
    if layout == "rows" or not _tiles(isa):
        return None
    # widened codes (q - qmin + code_shift, 2-6 bits) lie in [96, 159]: 6 bits a code in the tiles
    bits = 6 if layout == "tiled" and st.bits == 8 and st.code_shift >= 96 else st.bits
    return (native.load().q8_tile(st.codes, bits, st.out_features, st.in_features), _tile_groups(qscale),
            _tile_groups(qoffsets), bits)


def _few_rows(states: list[Q8State], x2: torch.Tensor) -> torch.Tensor:
    return native.load().q8gemm(x2, *q8gemm_args(states))


class PackedQ8Act(PackedAVX2):
    name = "packed_q8act"
    numerics = ("activations rounded to int8 per block of 32 (llama.cpp's Q8_0), integer dot products with "
                "int4/int8 codes, scales applied in fp32; prefill the same on AVX512-VNNI, "
                "else packed_avx2's")
    runtime_bytes_per_weight = 0.0

    def supports(self, module, device) -> bool:
        a = module.activation_scheme
        if a is not None and a != q8_0_activation():
            return False
        return device.type == "cpu" and format_supported(module, weight_only=False) and native.load() is not None

    def prepare(self, module, device, dtype) -> Q8State:
        st = super().prepare(module, device, dtype)
        s = module.scheme
        symmetric = module.zero_point() is None and s.zero_point != "min"
        half = st.scale.half()
        qscale = half if torch.equal(half.float(), st.scale) else st.scale
        qoffsets = torch.empty(0) if symmetric else st.offsets
        isa = isa_from_env()
        return Q8State(**{f.name: getattr(st, f.name) for f in fields(PackedState)}, qscale=qscale,
                       qoffsets=qoffsets, qbase=st.code_shift - s.qmin if symmetric else 0, isa=isa,
                       tiled=_tiled(st, qscale, qoffsets, isa))

    def run(self, module, state: Q8State, x):
        if x.numel() >= LARGE_M * module.in_features:
            if int8_prefill([state]):
                return run_fused([state], x, prefill=_few_rows)
            return super().run(module, state, fake_quant_input(module, x))
        return run_fused([state], x, few_rows=_few_rows)

    def fuse(self, modules, states):
        if not can_fuse(states) or len({m.activation_scheme for m in modules}) != 1:
            return None
        states = list(states)
        first = modules[0]
        cache: dict = {}  # run_fused's many-token weights

        def f(x: torch.Tensor) -> torch.Tensor:
            if x.numel() >= LARGE_M * first.in_features:
                if int8_prefill(states):
                    return run_fused(states, x, prefill=_few_rows)
                return run_fused(states, fake_quant_input(first, x), cache)
            return run_fused(states, x, few_rows=_few_rows)

        return f

    def native_spec(self, modules, states):
        """``q8gemm`` as :meth:`run` / :meth:`fuse` call it for fewer than ``LARGE_M`` rows (then the stacked
        bias added), for modules that can run as one call."""
        if not can_fuse(states) or len({m.activation_scheme for m in modules}) != 1:
            return None
        return native.load().LinearSpec.q8(*q8gemm_args(states), bias=stacked_bias(states))


register(PackedQ8Act())
