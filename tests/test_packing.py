import pytest
import torch

from llmquant.packing import pack, packed_numel, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1,), (7,), (13, 5), (3, 1001), (576, 192)])
def test_round_trip_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + sum(shape))
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8
    assert p.numel() == packed_numel(codes.numel(), bits)
    out = unpack(p, bits, codes.numel()).reshape(shape)
    assert torch.equal(out, codes)


def test_dense_sizes():
    n = 576 * 1536
    assert packed_numel(n, 8) == n
    assert packed_numel(n, 4) == n // 2
    assert packed_numel(n, 3) == n * 3 // 8
    assert packed_numel(n, 2) == n // 4
    assert packed_numel(3, 3) == 2  # 9 bits


def test_extremes_survive():
    for bits in range(1, 9):
        codes = torch.tensor([0, 2**bits - 1] * 5, dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, bits), bits, codes.numel()), codes)


def test_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 100)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_pack_in_chunks_equals_one_pass(bits, monkeypatch):
    """pack/unpack work a chunk of codes at a time (bounded temporaries): the bytes are those of one pass."""
    import llmquant.packing as P

    for n in (1, 7, 8, 9, 64, 65, 1000, 4103):
        c = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        whole = P.pack(c, bits)
        monkeypatch.setattr(P, "_CHUNK", 64)
        chunked = P.pack(c, bits)
        assert torch.equal(chunked, whole) and torch.equal(P.unpack(chunked, bits, n), c)
        monkeypatch.undo()


@pytest.mark.parametrize("name", ["W4G128", "W8", "W3G32", "W2G32"])
def test_row_blocks_dequantize_and_sqnr_as_the_whole(name):
    """QuantLinear.dequantize_weight(rows=...) unpacks only those rows' bytes and equals slicing the whole;
    the block-wise SQNR equals the one over the whole dequantized matrix."""
    from llmquant import QuantLinear
    from llmquant.algorithms.rtn import rtn_quantize
    from llmquant.schemes import PRESETS
    from llmquant.schemes.primitives import sqnr_db

    sch = PRESETS[name]
    for o, i in [(300, 256), (17, 200), (33, 24)]:
        w = torch.randn(o, i, generator=torch.Generator().manual_seed(o))
        ql = QuantLinear.from_quantized(*rtn_quantize(w, sch), sch)
        full = ql.dequantize_weight()
        for r0, r1 in [(0, o), (1, o), (0, 1), (o // 3, o)]:
            assert torch.equal(ql.dequantize_weight(rows=(r0, r1)), full[r0:r1])
        assert ql.weight_sqnr_db(w, block=1000) == pytest.approx(sqnr_db(w, full), rel=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 5, 8, 13, 4096 + 3])
def test_byte_aligned_widths_pack_as_the_general_stream(bits, n):
    """1/2/4-bit codes take byte operations; the bytes are those of the general little-endian stream
    (value i at bit i * bits), written out here by hand."""
    u = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    bitstream = 0
    for i, v in enumerate(u.tolist()):
        bitstream |= v << (i * bits)
    want = torch.tensor(list(bitstream.to_bytes(packed_numel(n, bits), "little")), dtype=torch.uint8)
    got = pack(u, bits)
    assert torch.equal(got, want)
    assert torch.equal(unpack(got, bits, n), u)
