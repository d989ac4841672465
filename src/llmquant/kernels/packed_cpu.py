"""``packed_avx2``: weight-only int4 / int8 GEMM that reads llmquant's packed codes directly (C++, AVX2+FMA).

Decode on a CPU is bound by the bytes of weights moved per token. This kernel streams the packed codes as
stored (0.5 byte per weight at 4 bits, 1 at 8 bits), unpacks them in registers and accumulates in fp32, so
its run-time state is the packed buffer itself plus one fp32 scale (and offset, for asymmetric schemes) per
group: nothing is dequantized into memory. Numerics are weight-only, ``x @ dequant(W)^T`` up to fp32
summation order (see ``csrc/qgemm_avx2.cpp`` for the algebra). Batches of at least ``LARGE_M`` rows
(prefill) go through fbgemm's fp16-weight GEMM instead (the ``fbgemm_fp16`` kernel, prepared on the first
such call and kept: 2 more bytes per weight at run time once a prompt has been processed, up to
``PREFILL_CACHE_BYTES`` for all modules together, by default an eighth of the machine's memory; past it,
dequantized for each such call). At 512 tokens
with 2 threads on a quiet machine it measured as fast as fp32 (benchmarks/results/kernels.md), where
dequantizing to fp32 per call was about 10% slower than fp32; no weight-only path beats fp32 there.
Without fbgemm they dequantize the weight to fp32 for the call and run PyTorch's float GEMM. Fused calls
(:meth:`PackedAVX2.fuse`, the lean runtime's q/k/v and gate/up) take the same fp16 GEMM with their stacked
weight (kept within the same budget). Under
``llmquant.autocast("bf16")`` (CPU bf16 autocast), many-token inputs instead take a bf16 GEMM with the
dequantized weight rounded to bf16 once and kept: the opt-in way to a prefill faster than fp32, at
autocast's numerics (bf16 activations).

Supported: CPU, 2 to 8 bits, per channel, per tensor or groups that are multiples of 32 (or of 16 values,
as llama.cpp's Q6_K / Q3_K / Q2_K, except for 4-bit codes), ``in_features`` a multiple of 32, any zero
point, no activation quantization. Everything else goes to the next kernel. Codes
of 2, 3, 5, 6 or 7 bits (W3G32, gguf:Q5_0 / Q5_1 / Q5_K ...) are widened at load to one byte each and run
the 8-bit path (1 byte per weight read at run time, kept in the prepared state next to the stored codes);
their scales, offsets and numerics are as stored.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..resources import memory_limit_bytes
from . import native
from .base import KERNELS, Kernel, register

#: Rows of x from which the dequantize-then-float-GEMM path is taken.
LARGE_M = 16


def _prefill_budget() -> int:
    """``LLMQUANT_PREFILL_CACHE_MB`` if set, else an eighth of the memory this process may use (the machine's,
    or its cgroup's limit), at least 512 MB."""
    env = os.environ.get("LLMQUANT_PREFILL_CACHE_MB")
    if env is not None:
        return int(float(env) * 1e6)
    return max(512_000_000, memory_limit_bytes() // 8)


#: The most bytes of fp16 prefill weights kept across all modules (see :func:`_prefill_budget`): the default
#: model's are 212 MB, a ~1B model's 1.6 GB (kept on a 16 GB machine), an 8B model's 14 GB; past the budget
#: a module prepares its fp16 weight for each many-token call instead of keeping it (2-3x slower prefill).
PREFILL_CACHE_BYTES = _prefill_budget()
_kept = [0]


def _keep_prefill_copy(state, nbytes: int) -> bool:
    """Reserve ``nbytes`` of the prefill-copy budget for ``state`` (given back when the state is freed)."""
    if _kept[0] + nbytes > PREFILL_CACHE_BYTES:
        return False
    _kept[0] += nbytes
    weakref.finalize(state, _release, nbytes)
    return True


def _release(nbytes: int) -> None:
    _kept[0] -= nbytes


def format_supported(module, weight_only: bool = True) -> bool:
    """Whether the packed kernels read this module's weights (``weight_only``: and it has no activation scheme)."""
    s = module.scheme
    k = module.in_features
    if (weight_only and module.activation_scheme is not None) or not 2 <= s.bits <= 8 or k % 32:
        return False
    if s.granularity == "group":  # groups of 16 (Q6_K, Q3_K, Q2_K): on the 8-bit path, two groups per block
        return s.group_size % 32 == 0 or (s.group_size == 16 and s.bits != 4)
    return s.granularity in ("channel", "tensor")


@dataclass(frozen=True, eq=False)
class PackedState:
    """What :meth:`PackedAVX2.prepare` builds from a module: its packed codes as stored (or widened to a byte)
    and one fp32 scale and offset per group, so that ``W = (u - b) * scale + offsets`` for the codes ``u``
    (``b`` = 128 at 8 bits, 0 at 4; see ``csrc/qgemm_avx2.cpp``)."""

    codes: torch.Tensor  # the module's packed ``qweight`` (uint8), not copied
    scale: torch.Tensor  # (out_features, groups) fp32
    offsets: torch.Tensor  # (out_features, groups) fp32
    bias: torch.Tensor | None  # (out_features,) fp32
    bits: int
    out_features: int
    in_features: int
    group_size: int  # in_features for per-channel and per-tensor schemes
    code_shift: int = 0  # added to widened codes (2/3/5/6/7 bits): codes = q - qmin + code_shift
    # many-token states built on first use and kept: "fp16" (fbgemm's prepared weight), "bf16" (autocast)
    prefill: dict = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return self.scale.shape[1]


class PackedAVX2(Kernel):
    name = "packed_avx2"
    numerics = "weight-only: fp32 activations x int4/int8 codes unpacked in registers, fp32 accumulate"
    runtime_bytes_per_weight = 0.0  # reads the stored packed codes (4/8 bits; others widened to 1 byte); adds fp32 scales

    def supports(self, module, device) -> bool:
        return device.type == "cpu" and format_supported(module) and native.load() is not None

    def prepare(self, module, device, dtype) -> PackedState:
        s = module.scheme
        n, k = module.out_features, module.in_features
        gs = s.group_size if s.granularity == "group" else k
        scale = module.scale.float().reshape(-1, module.scale.shape[-1]).expand(n, -1).contiguous()
        z = module.zero_point()
        zf = 0.0 if z is None else z.float().reshape(-1, scale.shape[1]).expand(n, -1)
        bits, codes, shift = s.bits, module.qweight, 0
        if bits not in (4, 8):  # widened: the stored codes u = q - qmin, one byte each, centred on 128 (so that
            from ..packing import unpack  # the kernel's (u - 128) * scale + offsets does not cancel in fp32)

            shift = 128 - (1 << (s.bits - 1))
            bits, codes = 8, unpack(module.qweight, s.bits, n * k) + shift
        b = 128 - shift if bits == 8 else 0
        if s.zero_point == "min":  # W = (q - qmin) * scale + m, the float minimum m stored as the "zero"
            offsets = (zf + b * scale).contiguous()
        else:
            offsets = ((s.qmin + b - zf) * scale).contiguous()  # W = (u - b) * scale + offsets, u = the stored codes
        bias = None if module.bias is None else module.bias.float()
        return PackedState(codes.contiguous(), scale, offsets, bias, bits, n, k, gs, shift)

    def run(self, module, state: PackedState, x):
        if x.numel() >= LARGE_M * module.in_features:
            if autocast_bf16(x):  # the bf16 weight is kept in the state, as the fp16 one
                return run_fused([state], x, state.prefill)
            if KERNELS["fbgemm_fp16"].supports(module, x.device):
                fp16 = KERNELS["fbgemm_fp16"]
                if "fp16" not in state.prefill:
                    if not _keep_prefill_copy(state, 2 * module.in_features * module.out_features):
                        # over the budget: the same fp16 weight, prepared for this call only (the numerics do
                        # not depend on what else the process holds)
                        return fp16.run(module, fp16.prepare(module, x.device, x.dtype), x)
                    state.prefill["fp16"] = fp16.prepare(module, x.device, x.dtype)
                return fp16.run(module, state.prefill["fp16"], x)
        return run_fused([state], x)

    def fuse(self, modules, states):
        """One pass over the modules' packed buffers (nothing copied) when they have the same bits, width and
        groups; the stacked prefill weight (fp16, or bf16 under bf16 autocast) is built on first use and kept."""
        if not can_fuse(states):
            return None
        states = list(states)
        cache: dict = {}
        return lambda x: run_fused(states, x, cache)

    def native_spec(self, modules, states):
        """``qgemm`` on the packed buffers as :func:`run_fused` calls it for fewer than ``LARGE_M`` rows (then
        the stacked bias added), for states that can run as one call."""
        if not can_fuse(states):
            return None
        return native.load().LinearSpec.packed(*qgemm_args(states), bias=stacked_bias(states))


def autocast_bf16(x: torch.Tensor) -> bool:
    """Whether ``x`` is being computed under CPU bf16 autocast (``llmquant.autocast("bf16")``)."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def can_fuse(states: list[PackedState]) -> bool:
    """True when prepared states (of this kernel) can run as one call: same bits, width and groups."""
    return len({(st.bits, st.in_features, st.group_size, st.groups) for st in states}) == 1


def qgemm_args(states: list[PackedState]) -> tuple:
    """The extension's ``qgemm`` arguments after ``x``: codes, scales, offsets (one per state), bits, group size."""
    return ([st.codes for st in states], [st.scale for st in states], [st.offsets for st in states],
            states[0].bits, states[0].group_size)


def stacked_bias(states: list[PackedState]) -> torch.Tensor | None:
    """The states' biases side by side (zeros for those without one); None when none has one."""
    biases = [st.bias for st in states]
    return None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(st.out_features) for b, st in zip(biases, states)])


class _PrefillCopy:
    """Owner of a fused call's kept fp16 prefill weight (its budget is given back when the owner goes)."""


def _fbgemm_fp16_available() -> bool:
    from .fbgemm import _AVAILABLE

    return _AVAILABLE


def run_fused(states: list[PackedState], x: torch.Tensor, cache: dict | None = None,
              few_rows=None, prefill=None) -> torch.Tensor:
    """``x @ [W_1; W_2; ...]^T (+ biases)`` for modules prepared by :class:`PackedAVX2` that share the input
    (fused QKV or gate/up: one pass, one thread launch, buffers left where they are).

    ``few_rows(states, x2)``, when given, computes the product (without bias) for fewer than ``LARGE_M`` rows
    of fp32 ``x2`` in place of the int16-activation kernel (``packed_q8act``'s int8 one); ``prefill(states,
    x2)`` the same for more rows (``packed_q8act``'s int8 prefill), in place of the GEMMs below.

    ``cache``: a fused call's dict (from :meth:`PackedAVX2.fuse`) for its many-token weights. Under bf16
    autocast, many-token inputs take a bf16 GEMM (output bf16, as autocast's linear) with the stacked
    dequantized weight rounded to bf16 once, what autocast does for a float Linear (``cache["bf16"]``; without
    a cache, rebuilt per call); otherwise fbgemm's fp16-weight GEMM, the stacked weight kept as
    ``cache["fp16"]`` within the prefill-copy budget."""
    s0 = states[0]
    bits, k, gs = s0.bits, s0.in_features, s0.group_size
    ext = native.load()
    shape = x.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    n = sum(st.out_features for st in states)

    def dequant(st: PackedState) -> torch.Tensor:
        return ext.dequant(st.codes, st.scale, st.offsets, bits, st.out_features, k, gs)

    if m >= LARGE_M and autocast_bf16(x):
        cache = {} if cache is None else cache
        if "bf16" not in cache:
            w = torch.cat([dequant(st) for st in states])
            b = stacked_bias(states)
            cache["bf16"] = (w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16))
        w, b = cache["bf16"]
        return F.linear(x2.to(torch.bfloat16), w, b).reshape(*shape[:-1], n)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    bias = stacked_bias(states)
    if m >= LARGE_M and prefill is not None:
        y = prefill(states, x2.contiguous())
        if bias is not None:
            y = y + bias
    elif m >= LARGE_M and cache is not None and _fbgemm_fp16_available():  # a fused call (fuse() keeps a cache)
        # fbgemm's fp16-weight GEMM, as an unfused module's prefill takes (the same fp16 weights): the stacked
        # weight prepared once and kept within the prefill-copy budget, else prepared for this call
        packed = cache.get("fp16")
        if packed is None:
            w = torch.cat([dequant(st) for st in states]) if len(states) > 1 else dequant(s0)
            packed = torch.ops.quantized.linear_prepack_fp16(w, None)
            owner = _PrefillCopy()
            if _keep_prefill_copy(owner, 2 * n * k):
                cache["fp16"], cache["owner"] = packed, owner
        y = torch.ops.quantized.linear_dynamic_fp16(x2.contiguous(), packed)
        if bias is not None:
            y = y + bias
    elif m >= LARGE_M:
        w = torch.cat([dequant(st) for st in states]) if len(states) > 1 else dequant(s0)
        y = F.linear(x2, w, bias)
    else:
        if few_rows is not None:
            y = few_rows(states, x2.contiguous())
        else:
            y = ext.qgemm(x2.contiguous(), *qgemm_args(states))
        if bias is not None:
            y = y + bias
    return y.reshape(*shape[:-1], n).to(x.dtype)


register(PackedAVX2())
