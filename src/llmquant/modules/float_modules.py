"""Linears and embeddings whose weight is stored in bf16 or fp16 (what a mixed-precision plan's float
formats put in a model).

``FloatLinear``    a linear whose weight is stored in bf16 or fp16 (a buffer named ``weight``). It computes in
                   the input's dtype: with fp32 inputs the weight is upcast once and kept (exact: every
                   bf16/fp16 value is an fp32 value); under ``torch.autocast`` to the weight's own dtype the
                   stored weight is used as is.
``FloatEmbedding`` the same for an embedding; lookups return fp32 (or the autocast dtype).

Each records what ``load`` needs in the manifest (``manifest_entry`` / ``from_manifest``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..schemes.formats import FLOAT_DTYPES


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


def embed_scale_of(emb: nn.Module) -> float | None:
    """The constant a model family's embedding multiplies its rows by (Gemma's ``*ScaledWordEmbedding``:
    sqrt(hidden)), or None for a plain embedding."""
    v = getattr(emb, "scalar_embed_scale", None)
    if v is None and isinstance(getattr(emb, "embed_scale", None), torch.Tensor):
        v = emb.embed_scale.item()
    return None if v is None else float(v)


def apply_embed_scale(rows: torch.Tensor, scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """``rows * scale`` as those embeddings compute it: the scale rounded to the stored weight's dtype."""
    return rows if scale is None else rows * torch.tensor(scale).to(dtype)


class FloatEmbedding(_CachedCast):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.bfloat16,
                 padding_idx: int | None = None, embed_scale: float | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.embed_scale = embed_scale
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=dtype))
        self._reset()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, dtype: torch.dtype, weight: torch.Tensor | None = None) -> "FloatEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, dtype, padding_idx=emb.padding_idx, embed_scale=embed_scale_of(emb))
        m.weight = (emb.weight if weight is None else weight).detach().to(dtype).clone()
        return m.to(emb.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx)
        return apply_embed_scale(rows, self.embed_scale, self.weight.dtype).float()

    def manifest_entry(self) -> dict:
        return {"type": "FloatEmbedding", "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "dtype": _dtype_name(self.weight.dtype), "padding_idx": self.padding_idx, "embed_scale": self.embed_scale}

    @classmethod
    def from_manifest(cls, e: dict) -> "FloatEmbedding":
        return cls(e["num_embeddings"], e["embedding_dim"], FLOAT_DTYPES[e["dtype"]], e.get("padding_idx"),
                   e.get("embed_scale"))
