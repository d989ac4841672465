"""Per-architecture facts as data (decoder-layer path, norm -> linear pairs, tied embeddings)."""

from .arch import ARCHS, DECODER_LAYOUTS, ArchSpec, DecoderLayout, arch_for, context_length, decoder_layout_for, tied_lm_head

__all__ = ["ARCHS", "DECODER_LAYOUTS", "ArchSpec", "DecoderLayout", "arch_for", "context_length", "decoder_layout_for",
           "tied_lm_head"]
