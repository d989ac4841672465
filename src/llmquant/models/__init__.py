"""Per-architecture facts as data (decoder-layer path, norm -> linear pairs, tied embeddings)."""

from .arch import ARCHS, ArchSpec, arch_for, context_length, tied_lm_head

__all__ = ["ARCHS", "ArchSpec", "arch_for", "context_length", "tied_lm_head"]
