"""Modules a mixed-precision plan puts in a model besides :class:`QuantLinear`.

``FloatLinear``    a linear whose weight is stored in bf16 or fp16 (a buffer named ``weight``). It computes in
                   the input's dtype: with fp32 inputs the weight is upcast once and kept (exact: every
                   bf16/fp16 value is an fp32 value); under ``torch.autocast`` to the weight's own dtype the
                   stored weight is used as is.
``FloatEmbedding`` the same for an embedding; lookups return fp32 (or the autocast dtype).
``QuantEmbedding`` an embedding holding packed integer codes with QuantLinear's layout (``qweight``,
                   ``scale``, ``zero``); rows are dequantized once and kept. A tied embedding and output head
                   can share one set of tensors: ``QuantEmbedding.sharing(qlinear)`` (saved once).

Each records what ``load`` needs in the manifest (``manifest_entry`` / ``from_manifest``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..packing import packed_numel
from ..schemes import QuantScheme
from ..schemes.formats import FLOAT_DTYPES
from ..schemes.primitives import scale_torch_dtype
from .quant_linear import QuantLinear


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class _CachedCast(nn.Module):
    """Keeps one upcast copy of ``self.weight`` per (device, dtype); dropped on .to() and state loads."""

    def _reset(self) -> None:
        self._cast_key = self._cast = None

    def _weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        key = (self.weight.device, dtype, self.weight.data_ptr())
        if self._cast_key != key:
            self._cast = self._materialize(dtype)
            self._cast_key = key
        return self._cast

    def _materialize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    def _apply(self, fn, recurse=True):
        self._reset()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._reset()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cast_key"] = state["_cast"] = None
        return state


class FloatLinear(_CachedCast):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 bias: bool = False, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._reset()

    @classmethod
    def from_linear(cls, lin: nn.Linear, dtype: torch.dtype, weight: torch.Tensor | None = None) -> "FloatLinear":
        w = lin.weight if weight is None else weight
        m = cls(lin.in_features, lin.out_features, dtype, bias=lin.bias is not None,
                bias_dtype=lin.bias.dtype if lin.bias is not None else torch.float32)
        m.weight = w.detach().to(dtype).clone()
        if lin.bias is not None:
            m.bias = lin.bias.detach().clone()
        return m.to(w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ac = _autocast_dtype(x.device)
        if ac is not None and ac == self.weight.dtype:
            w = self.weight  # autocast casts x to this dtype; no copy of the weight
        else:
            w = self.weight if x.dtype == self.weight.dtype else self._weight_as(x.dtype)
        b = None if self.bias is None else self.bias.to(w.dtype if ac is None else self.bias.dtype)
        return F.linear(x, w, b)

    def manifest_entry(self) -> dict:
        return {"type": "FloatLinear", "in_features": self.in_features, "out_features": self.out_features,
                "dtype": _dtype_name(self.weight.dtype), "bias": self.bias is not None,
                "bias_dtype": None if self.bias is None else _dtype_name(self.bias.dtype)}

    @classmethod
    def from_manifest(cls, e: dict) -> "FloatLinear":
        return cls(e["in_features"], e["out_features"], FLOAT_DTYPES[e["dtype"]], bias=e["bias"],
                   bias_dtype=FLOAT_DTYPES[e["bias_dtype"]] if e.get("bias_dtype") else torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={_dtype_name(self.weight.dtype)}"


class FloatEmbedding(_CachedCast):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.bfloat16,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=dtype))
        self._reset()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, dtype: torch.dtype, weight: torch.Tensor | None = None) -> "FloatEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, dtype, padding_idx=emb.padding_idx)
        m.weight = (emb.weight if weight is None else weight).detach().to(dtype).clone()
        return m.to(emb.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).float()

    def manifest_entry(self) -> dict:
        return {"type": "FloatEmbedding", "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "dtype": _dtype_name(self.weight.dtype), "padding_idx": self.padding_idx}

    @classmethod
    def from_manifest(cls, e: dict) -> "FloatEmbedding":
        return cls(e["num_embeddings"], e["embedding_dim"], FLOAT_DTYPES[e["dtype"]], e.get("padding_idx"))


class QuantEmbedding(_CachedCast):
    """Packed integer embedding with QuantLinear's storage layout (rows = tokens, columns = features)."""

    codes = QuantLinear.codes
    zero_point = QuantLinear.zero_point
    dequantize_weight = QuantLinear.dequantize_weight

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_features, self.in_features = num_embeddings, embedding_dim
        self.scheme = scheme
        rows = 1 if scheme.granularity == "tensor" else num_embeddings
        groups, sdt = scheme.num_groups(embedding_dim), scale_torch_dtype(scheme)
        self.register_buffer("qweight", torch.zeros(packed_numel(num_embeddings * embedding_dim, scheme.bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, groups, dtype=sdt))
        if scheme.symmetric:
            self.zero = None
        else:
            self.register_buffer("zero", torch.zeros(rows, groups, dtype=torch.uint8 if scheme.zero_point == "int" else sdt))
        self._reset()

    @property
    def weight(self) -> torch.Tensor:  # what _CachedCast keys on
        return self.qweight

    def _materialize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize_weight(dtype=dtype, device=self.qweight.device)

    @classmethod
    def sharing(cls, q: QuantLinear, padding_idx: int | None = None) -> "QuantEmbedding":
        """An embedding that reads the same packed tensors as the output head ``q`` (tied weights)."""
        m = cls(q.out_features, q.in_features, q.scheme, padding_idx)
        m.qweight, m.scale = q.qweight, q.scale
        if q.zero is not None:
            m.zero = q.zero
        return m

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._weight_as(torch.float32), self.padding_idx)

    def manifest_entry(self) -> dict:
        return {"type": "QuantEmbedding", "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "scheme": self.scheme.to_dict(), "padding_idx": self.padding_idx}

    @classmethod
    def from_manifest(cls, e: dict) -> "QuantEmbedding":
        return cls(e["num_embeddings"], e["embedding_dim"], QuantScheme.from_dict(e["scheme"]), e.get("padding_idx"))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}"


#: Module types the folder format rebuilds from their manifest entry.
MIXED_MODULES = {c.__name__: c for c in (FloatLinear, FloatEmbedding, QuantEmbedding)}
