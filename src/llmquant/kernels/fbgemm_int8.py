"""fbgemm's int8 x int8 GEMM for W8A8 modules on CPU, fed with llmquant's own activation codes.

``quantized::linear_with_input_q_dq_qweight_dq_output_fp32(x, s, z, W)`` quantizes a float input with the
one scale and zero point it is given (``u = clamp(z + round(x / s), 0, 255)``), multiplies by the prepacked
int8 per-channel weight with int32 accumulation and writes ``s * s_w * acc (+ b)`` in fp32. Its own
rounding (``x * (1 / s)``) disagrees with the reference's ``x / s`` exactly where it matters most: with the
full signed grid the largest |x| of each token sits on a tie (``127.5``), so the codes of the largest value
could differ by one. So llmquant computes the int8 codes itself (the reference's operations, bit for bit),
passes them as integer-valued floats with ``s = 1, z = 128`` (fbgemm's quantize is then exact), and applies
the per-token (or per-tensor) activation scale and the bias on the fp32 output in one ``torch.addcmul``
(asymmetric activations or weights add one ``addcmul`` each for their zero-point corrections). The result equals the reference up to float rounding of the rescale,
for per-token and per-tensor, symmetric and asymmetric, dynamic and static schemes, at every batch size.

This is not ``quantized::linear_dynamic`` (fbgemm's own dynamic path, which chooses asymmetric per-tensor
qparams itself, optionally with a 7-bit range; ``torch.ao.quantization.quantize_dynamic`` runs that one and
the benchmark measures it as the reference point). Measured on this 2-core AVX-512 CPU: see
benchmarks/bench_dynamic.py and BENCHMARKS.md.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .base import Kernel, register
from .int8 import int8_codes, outlier_product, split_input, supports_w8a8, w8_state


def _available() -> bool:
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
            torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
        )
    except Exception:  # pragma: no cover
        return False


_AVAILABLE = _available()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: no flags known
        pass
    return set()


#: fbgemm's uint8 x int8 products are exact in int32 only with VNNI (``vpdpbusd``). Without it (AVX2, AVX-512
#: without VNNI) it multiplies with ``vpmaddubsw``, whose sums of two adjacent products saturate at int16: with
#: llmquant's full-range codes (``u = c + 128`` up to 255, weights up to 127) a pair can reach 64770 and
#: clip, measured here as a 22.8 dB SQNR on a token next to one 1e6 times larger. The kernel then declines and
#: W8A8 modules take ``int8_int_mm`` (exact int32).
EXACT_INT8 = "avx512_vnni" in _cpu_flags()


def fbgemm_pack(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """Prepacked fbgemm weight from int8 codes (N, K) and per-channel (N,) or per-tensor scales."""
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; fbgemm still takes them
        warnings.simplefilter("ignore")
        q = codes.to(torch.int8).contiguous()
        s = scale.double().reshape(-1)
        if s.numel() == 1:
            qw = torch._make_per_tensor_quantized_tensor(q, float(s), 0)
        else:
            qw = torch._make_per_channel_quantized_tensor(q, s, torch.zeros_like(s, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().contiguous())


class FbgemmInt8(Kernel):
    name = "fbgemm_int8"
    numerics = (
        "W8A8: int8 activations (llmquant's per-token/per-tensor codes, exact) x int8 per-channel weights, "
        "int32 accumulate in fbgemm; activation scale, zero-point correction and bias in one fp32 addcmul"
    )
    runtime_bytes_per_weight = 1.0

    def supports(self, module, device) -> bool:
        return _AVAILABLE and EXACT_INT8 and device.type == "cpu" and supports_w8a8(module)

    def prepare(self, module, device, dtype):
        st = w8_state(module, torch.device("cpu"))
        bias = None if module.bias is None else module.bias.float()
        bz_ws = None if st.w_zero is None else st.w_zero.float() * st.w_scale
        packed = fbgemm_pack(st.w_t.t(), module.scale, None)
        # the int8 codes are kept only for LLM.int8() outlier columns
        keep = st if module.activation_scheme.outlier_threshold is not None else None
        return {"packed": packed, "rs_ws": st.row_sum.float() * st.w_scale, "bz_ws": bz_ws, "bias": bias, "w8": keep}

    def run(self, module, state, x):
        a, shape, x_rest, cols, x_cols, xs, xz = split_input(module, x)
        c = int8_codes(x_rest, a, xs, xz, as_float=True).contiguous()
        # fbgemm: sum_k c_x c_w * s_w; then the affine corrections of int_mm_w8a8, in float
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(c, 1.0, 128, state["packed"])
        shift = None if xz is None else 128 - xz
        if shift is not None:
            y = torch.addcmul(y, shift, state["rs_ws"])
        if state["bz_ws"] is not None:
            csum = c.sum(dim=1, keepdim=True)
            if shift is not None:
                csum = csum + shift * c.shape[1]
            y = torch.addcmul(y, csum, state["bz_ws"], value=-1)
        y = y * xs if state["bias"] is None else torch.addcmul(state["bias"], y, xs)
        if cols is not None:
            y = y + outlier_product(x_cols, cols, state["w8"])
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


register(FbgemmInt8())
