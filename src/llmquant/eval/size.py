"""True sizes: bytes as stored (packed codes, scales, zero points, float tensors; shared tensors once)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from ..modules import QuantEmbedding, QuantLinear


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
    seen: set[int] = set()
    qbytes = qparams = fbytes = total_params = qfp32 = 0
    for mod in model.modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            # a tied embedding and head may share their packed tensors (QuantEmbedding.sharing): count them once
            tensors = [t for t in (mod.qweight, mod.scale, mod.zero, getattr(mod, "bias", None)) if t is not None]
            if all(t.data_ptr() in seen for t in tensors):
                continue
            qbytes += sum(t.numel() * t.element_size() for t in tensors if t.data_ptr() not in seen)
            bias = getattr(mod, "bias", None)
            n = mod.in_features * mod.out_features
            qparams += n
            total_params += n + (0 if bias is None else bias.numel())
            qfp32 += 4 * (n + (0 if bias is None else bias.numel()))
            seen.update(t.data_ptr() for t in tensors)
            continue
        for t in list(mod.parameters(recurse=False)) + [
            b for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set
        ]:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            fbytes += t.numel() * t.element_size()
            total_params += t.numel()
    return SizeInfo(
        total_bytes=qbytes + fbytes,
        quantized_bytes=qbytes,
        float_bytes=fbytes,
        quantized_params=qparams,
        total_params=total_params,
        fp32_bytes=4 * total_params,
        quantized_layers_fp32_bytes=qfp32,
    )
