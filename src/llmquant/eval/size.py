"""True sizes: bytes as stored (packed codes, scales, zero points, float tensors; shared tensors once)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from ..modules import is_packed, tensor_bytes, unique_stored, weights_held


@dataclass
class SizeInfo:
    total_bytes: int  # everything saved in model.safetensors, shared tensors counted once
    quantized_bytes: int  # packed codes + scales + zero points + biases of QuantLinears
    float_bytes: int  # every other parameter and buffer
    quantized_params: int  # weights held by QuantLinears
    total_params: int  # all weights (quantized ones counted by their logical size)
    fp32_bytes: int  # what the same model takes in fp32
    quantized_layers_fp32_bytes: int  # what the quantized layers take in fp32

    @property
    def bits_per_weight_quantized(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def bits_per_weight_model(self) -> float:
        return 8 * self.total_bytes / max(self.total_params, 1)

    @property
    def ratio_to_fp32(self) -> float:
        return self.total_bytes / self.fp32_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            bits_per_weight_quantized=self.bits_per_weight_quantized,
            bits_per_weight_model=self.bits_per_weight_model,
            ratio_to_fp32=self.ratio_to_fp32,
        )
        return d


def model_size(model: nn.Module) -> SizeInfo:
    """Sums of what each module stores (:mod:`llmquant.modules.storage`), shared tensors once."""
    qbytes = qparams = fbytes = total_params = qfp32 = 0
    for mod, fresh in unique_stored(model):
        n = weights_held(mod, fresh)
        total_params += n
        if is_packed(mod):
            if fresh:
                qbytes += tensor_bytes(fresh)
                qparams += mod.in_features * mod.out_features
                qfp32 += 4 * n
        else:
            fbytes += tensor_bytes(fresh)
    return SizeInfo(
        total_bytes=qbytes + fbytes,
        quantized_bytes=qbytes,
        float_bytes=fbytes,
        quantized_params=qparams,
        total_params=total_params,
        fp32_bytes=4 * total_params,
        quantized_layers_fp32_bytes=qfp32,
    )
