"""fbgemm's int8 x int8 GEMM for W8A8 modules on CPU, fed with llmquant's own activation codes.

``quantized::linear_with_input_q_dq_qweight_dq_output_fp32(x, s, z, W)`` quantizes a float input with the
one scale and zero point it is given (``u = clamp(z + round(x / s), 0, 255)``), multiplies by the prepacked
int8 per-channel weight with int32 accumulation and writes ``s * s_w * acc (+ b)`` in fp32. Its own
rounding (``x * (1 / s)``) disagrees with the reference's ``x / s`` exactly where it matters most: with the
full signed grid the largest |x| of each token sits on a tie (``127.5``), so the codes of the largest value
could differ by one. So llmquant computes the int8 codes itself (the reference's operations, bit for bit),
passes them as integer-valued floats with ``s = 1, z = 128`` (fbgemm's quantize is then exact), and applies
the per-token (or per-tensor) activation scale, the asymmetric zero-point correction and the bias on the
fp32 output in one ``torch.addcmul``. The result equals the reference up to float rounding of the rescale,
for per-token and per-tensor, symmetric and asymmetric, dynamic and static schemes, at every batch size.

This is not ``quantized::linear_dynamic`` (fbgemm's own dynamic path, which chooses asymmetric per-tensor
qparams itself, optionally with a 7-bit range; ``torch.ao.quantization.quantize_dynamic`` runs that one and
the benchmark measures it as the reference point). Measured on this 2-core AVX-512 CPU: see
benchmarks/bench_dynamic.py and BENCHMARKS.md.
"""

from __future__ import annotations

import warnings

import torch

from .base import Kernel, register
from .int8 import activation_qparams, int8_codes, outlier_product, split_outliers, supports_w8a8


def _available() -> bool:
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
            torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
        )
    except Exception:  # pragma: no cover
        return False


_AVAILABLE = _available()


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
        return _AVAILABLE and device.type == "cpu" and supports_w8a8(module)

    def prepare(self, module, device, dtype):
        codes = module.codes()
        w_scale = module.scale.float().reshape(1, -1).expand(1, module.out_features).contiguous()
        # asymmetric activations: sum_k (u_k - z) w_k = sum_k (u_k - 128) w_k + (128 - z) sum_k w_k
        rs_ws = codes.sum(dim=1, dtype=torch.int32).float().reshape(1, -1) * w_scale
        bias = None if module.bias is None else module.bias.float()
        return {"packed": fbgemm_pack(codes, module.scale, None), "w_t": None, "w_scale": w_scale, "rs_ws": rs_ws,
                "bias": bias}

    def run(self, module, state, x):
        a = module.activation_scheme
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        x_rest, cols, x_cols = split_outliers(x2, a.outlier_threshold)
        xs, xz = activation_qparams(module, x_rest)
        c = int8_codes(x_rest, a, xs, xz, as_float=True).contiguous()
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(c, 1.0, 128, state["packed"])
        if xz is not None:
            y = torch.addcmul(y, 128 - xz, state["rs_ws"])
        y = y * xs if state["bias"] is None else torch.addcmul(state["bias"], y, xs)
        if cols is not None:
            if state["w_t"] is None:  # int8 (K, N) codes for the outlier columns, made on first use
                state["w_t"] = module.codes().t().contiguous().to(torch.int8)
            y = y + outlier_product(x_cols, cols, state["w_t"], state["w_scale"])
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


register(FbgemmInt8())
