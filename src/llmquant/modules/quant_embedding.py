"""``QuantEmbedding``: an embedding holding packed integer codes with QuantLinear's layout (``qweight``,
``scale``, ``zero``); a lookup dequantizes the rows of the tokens asked for, nothing else (no float copy of
the table is kept, so the packed size is the memory it takes). A tied embedding and output head can share one
set of tensors: ``QuantEmbedding.sharing(qlinear)`` (saved once). Records what ``load`` needs in the
manifest (``manifest_entry`` / ``from_manifest``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import packed_numel, unpack
from ..schemes import QuantScheme, dequantize
from ..schemes.primitives import scale_torch_dtype
from .float_modules import _CachedCast, apply_embed_scale
from .quant_linear import QuantLinear


class QuantEmbedding(_CachedCast):
    """Packed integer embedding with QuantLinear's storage layout (rows = tokens, columns = features)."""

    codes = QuantLinear.codes
    zero_point = QuantLinear.zero_point
    dequantize_weight = QuantLinear.dequantize_weight
    stored_tensors = QuantLinear.stored_tensors

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme, padding_idx: int | None = None,
                 embed_scale: float | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.embed_scale = embed_scale  # rows times this constant (Gemma's scaled embeddings), or None
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
    def sharing(cls, q: QuantLinear, padding_idx: int | None = None, embed_scale: float | None = None) -> "QuantEmbedding":
        """An embedding that reads the same packed tensors as the output head ``q`` (tied weights)."""
        m = cls(q.out_features, q.in_features, q.scheme, padding_idx, embed_scale)
        m.qweight, m.scale = q.qweight, q.scale
        if q.zero is not None:
            m.zero = q.zero
        return m


    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return apply_embed_scale(self.lookup(ids), self.embed_scale, torch.float32)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ids`` (any shape) -> their rows dequantized, shape ``(*ids.shape, embedding_dim)``; the same
        values as the rows of ``dequantize_weight()`` (without ``embed_scale``)."""
        flat = ids.reshape(-1).to(torch.long)
        n, bits, s = self.embedding_dim, self.scheme.bits, self.scheme
        if (n * bits) % 8 or s.granularity == "tensor":  # rows do not start on whole bytes: the whole table
            return F.embedding(ids, self._weight_as(dtype), self.padding_idx)
        per_row = n * bits // 8
        u = unpack(self.qweight.view(self.num_embeddings, per_row)[flat].reshape(-1), bits, flat.numel() * n)
        q = (u.to(torch.int16) + s.qmin).reshape(-1, n)
        z = self.zero_point()
        w = dequantize(q, self.scale[flat], None if z is None else z[flat], s, dtype=dtype)
        return w.reshape(*ids.shape, n)

    def manifest_entry(self) -> dict:
        return {"type": "QuantEmbedding", "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "scheme": self.scheme.to_dict(), "padding_idx": self.padding_idx, "embed_scale": self.embed_scale}

    @classmethod
    def from_manifest(cls, e: dict) -> "QuantEmbedding":
        return cls(e["num_embeddings"], e["embedding_dim"], QuantScheme.from_dict(e["scheme"]), e.get("padding_idx"),
                   e.get("embed_scale"))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}"
