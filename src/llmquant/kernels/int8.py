"""int8 x int8 -> int32 GEMM for W8A8 modules (weights int8 per output channel, symmetric or with an
integer zero point per channel; activations int8).

Activations are quantized per token (dynamic), per tensor (dynamic) or with a calibrated per-tensor scale
(static). The integer product runs through ``torch._int_mm`` (CPU: any shape; CUDA: M > 16 and K, N
multiples of 8, so small batches are padded to 17 rows and other shapes fall back to an exact float
product); the int32 result is converted, rescaled by ``x_scale * w_scale`` and biased in one
``torch.addcmul`` (the rescale fusion PyTorch offers without a compiler). Asymmetric activations are
handled without widening: with codes ``u`` in [0, 255] and zero point ``z``,
``sum_k (u_k - z) w_k = sum_k (u_k - 128) w_k + (128 - z) sum_k w_k``, so the GEMM takes ``u - 128`` as
int8 and a per-output-channel row sum corrects it.

Outliers (LLM.int8(), Dettmers et al. 2022, eq. 7): with a threshold ``t`` on the activation scheme, the
input columns ``O = {k : max_m |x_mk| >= t}`` are taken out of the int8 product and multiplied in float
with the dequantized weight columns, ``y = s_x s_w (Q(x_{:,~O}) Q(W_{:,~O})^T) + x_{:,O} W_hat_{:,O}^T``;
the per-token scales are computed from the remaining columns only.

The activation codes here equal :func:`llmquant.kernels.reference.fake_quant_input`'s bit for bit (same
operations in the same order), so the only difference from the reference is float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schemes import QuantScheme, qparams_from_minmax
from ..schemes.primitives import round_to_grid, scale_from_absmax
from .base import Kernel, register


def dynamic_qparams(x2: torch.Tensor, a: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token (M, 1) or per-tensor (1, 1) min-max qparams of a 2-D float input, zero as float: those of
    :func:`llmquant.schemes.compute_qparams` (the same bits), without its reshapes and copies."""
    per_token = a.granularity == "token"
    if a.symmetric and not a.signed_scale:  # max|x| in one reduction
        amax = x2.abs().amax(dim=1, keepdim=True) if per_token else x2.abs().amax().reshape(1, 1)
        return scale_from_absmax(amax, a), None
    if per_token:
        xmin, xmax = x2.amin(dim=1, keepdim=True), x2.amax(dim=1, keepdim=True)
    else:
        xmin, xmax = x2.amin().reshape(1, 1), x2.amax().reshape(1, 1)
    scale, zero = qparams_from_minmax(xmin, xmax, a)
    return scale, None if zero is None else zero.float()


def int8_codes(x2: torch.Tensor, a: QuantScheme, scale: torch.Tensor, zero: torch.Tensor | None, as_float: bool = False):
    """int8 codes of ``x2``: symmetric codes as they are, asymmetric codes ``u`` in [0, 255] as ``u - 128``
    (int8, or integer-valued float32 with ``as_float``)."""
    q = round_to_grid(x2, scale, zero, a)
    if zero is not None:
        q = q.sub_(128)
    return q if as_float else q.to(torch.int8)


def activation_qparams(module, x2: torch.Tensor):
    """``(scale, zero)`` of the module's activation scheme for ``x2``: computed from it (dynamic) or the
    calibrated per-tensor ones (static); zero is None for symmetric schemes."""
    a = module.activation_scheme
    if a.dynamic:
        return dynamic_qparams(x2, a)
    z = getattr(module, "input_zero", None)
    return module.input_scale.float().reshape(1, 1), None if z is None else z.float().reshape(1, 1)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32, respecting ``torch._int_mm``'s shape rules."""
    if a.device.type == "cuda":
        m, k = a.shape
        n = b.shape[1]
        if k % 8 or n % 8:
            return (a.float() @ b.float()).to(torch.int32)  # exact: |sums| < 2^24 for K < 1024
        if m <= 16:
            pad = torch.zeros(17 - m, k, dtype=a.dtype, device=a.device)
            return torch._int_mm(torch.cat([a, pad]), b)[:m]
    return torch._int_mm(a, b)


def supports_w8a8(module) -> bool:
    a, w = module.activation_scheme, module.scheme
    return (
        a is not None
        and a.bits == 8
        and w.bits == 8
        and (w.symmetric or w.zero_point == "int")
        and (a.symmetric or a.zero_point == "int")  # the GEMM's zero-point shift needs integer zero points
        and w.granularity in ("channel", "tensor")
        and a.granularity in ("token", "tensor")
    )


def split_outliers(x2: torch.Tensor, threshold: float | None):
    """``(x_rest, cols, x_cols)``: the input with outlier columns zeroed, their indices and their values;
    ``cols`` is None when no column reaches the threshold (or there is none)."""
    if threshold is None:
        return x2, None, None
    cols = (x2.abs() >= threshold).any(dim=0).nonzero().squeeze(1)
    if cols.numel() == 0:
        return x2, None, None
    return x2.index_fill(1, cols, 0.0), cols, x2.index_select(1, cols)


@dataclass
class W8State:
    """Run-time int8 weight: ``w_t`` (K, N) int8 codes ``c_w`` (asymmetric codes ``u - 128``), so that
    ``W_hat = (c_w - b) * s_w``; ``row_sum`` = sum_k c_w (1, N) int32; ``w_zero`` = b (1, N) int32 or None."""

    w_t: torch.Tensor
    w_scale: torch.Tensor
    row_sum: torch.Tensor
    w_zero: torch.Tensor | None


def w8_state(module, device) -> W8State:
    codes = module.codes().to(device)
    z = module.zero_point()
    w_zero = None
    if z is not None:  # asymmetric: codes u in [0, 255], u - z = (u - 128) - (z - 128)
        codes = codes - 128
        w_zero = (z.to(torch.int32) - 128).reshape(1, -1).expand(1, module.out_features).contiguous().to(device)
    return W8State(
        w_t=codes.t().contiguous().to(torch.int8),
        w_scale=module.scale.float().reshape(1, -1).expand(1, module.out_features).contiguous().to(device),
        row_sum=codes.sum(dim=1, dtype=torch.int32).reshape(1, -1).to(device),
        w_zero=w_zero,
    )


def outlier_product(x_cols: torch.Tensor, cols: torch.Tensor, st: W8State) -> torch.Tensor:
    """Float product of the outlier columns with the dequantized weight columns: (M, |O|) @ (|O|, N)."""
    w = st.w_t.index_select(0, cols).float()
    if st.w_zero is not None:
        w = w - st.w_zero
    return x_cols @ (w * st.w_scale)


def int_mm_w8a8(x2, a, xs, xz, st: W8State, bias) -> torch.Tensor:
    """``y = s_x s_w (Q(x) Q(W)^T) + b`` through ``torch._int_mm`` with activation qparams ``xs``/``xz``.

    With activation codes ``c_x = u_x - 128`` (``a = 128 - z_x``, 0 if symmetric) and weight codes ``c_w``
    (``b = z_w - 128``, 0 if symmetric): ``sum_k (c_x + a)(c_w - b) = c_x . c_w + a sum c_w - b sum (c_x + a)``.
    """
    c = int8_codes(x2, a, xs, xz)
    acc = int_mm(c, st.w_t)
    shift = None if xz is None else (128 - xz).to(torch.int32)  # (M, 1) or (1, 1)
    if shift is not None:
        acc = acc + shift * st.row_sum
    if st.w_zero is not None:
        csum = c.sum(dim=1, keepdim=True, dtype=torch.int32)
        if shift is not None:
            csum = csum + shift * c.shape[1]
        acc = acc - csum * st.w_zero
    scale = xs * st.w_scale  # (M, 1) x (1, N) outer product
    if bias is None:
        return acc * scale
    return torch.addcmul(bias.float(), acc, scale)  # int32 -> float, rescale and bias in one pass


def split_input(module, x: torch.Tensor):
    """What every W8A8 kernel does first: the activation scheme, the input's shape, the 2-D float input split
    into its int8 part and its LLM.int8() outlier columns, and the int8 part's activation qparams."""
    a = module.activation_scheme
    shape = x.shape
    x_rest, cols, x_cols = split_outliers(x.reshape(-1, shape[-1]).float(), a.outlier_threshold)
    xs, xz = activation_qparams(module, x_rest)
    return a, shape, x_rest, cols, x_cols, xs, xz


class Int8IntMM(Kernel):
    name = "int8_int_mm"
    numerics = "W8A8: int8 activations (per token or per tensor) x int8 weights, int32 accumulate"
    runtime_bytes_per_weight = 1.0

    def supports(self, module, device) -> bool:
        return supports_w8a8(module)

    def prepare(self, module, device, dtype):
        return w8_state(module, device)

    def run(self, module, state, x):
        a, shape, x_rest, cols, x_cols, xs, xz = split_input(module, x)
        y = int_mm_w8a8(x_rest, a, xs, xz, state, module.bias)
        if cols is not None:
            y = y + outlier_product(x_cols, cols, state)
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


register(Int8IntMM())
