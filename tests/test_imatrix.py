"""llama.cpp's importance matrix (GGUF form): written from calibration text, read back exactly, the same
squared-input sums the calibration statistics hold; files of another kind or another model are refused."""

import numpy as np
import pytest
import torch

import llmquant
from llmquant.cli import main as cli
from llmquant.errors import CalibrationError, CorruptFileError, OutputExistsError
from llmquant.flows.stats import StatsCollector
from llmquant.io.imatrix import ImportanceMatrix, imatrix_from_calibration, importance_for, read_imatrix, write_imatrix
from llmquant.modules import select_linears

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
WINDOWS = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(3))


def test_write_read_round_trip_in_llama_cpp_layout(tmp_path):
    import gguf

    m = make_tiny_llama(vocab_size=1000)
    im = imatrix_from_calibration(m, WINDOWS, dataset="calib.txt", progress=False)
    assert len(im.sums) == 14 and "blk.1.ffn_down.weight" in im.sums  # every decoder-layer linear, llama.cpp's names
    write_imatrix(im, tmp_path / "m.gguf")
    back = read_imatrix(tmp_path / "m.gguf")
    for n in im.sums:
        assert np.array_equal(back.sums[n], im.sums[n].astype(np.float32)) and np.array_equal(back.counts[n], [128.0])
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 4, 32)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = [t.name for t in r.tensors]
    assert names == sorted(names, key=lambda n: n.rsplit(".", 1)[0]) and names[0] == "blk.0.attn_k.weight.in_sum2"
    shapes = {t.name: t.shape.tolist() for t in r.tensors}  # ggml order: (in_features, n_mat), (1, n_mat)
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == [160, 1] and shapes["blk.0.ffn_down.weight.counts"] == [1, 1]
    with pytest.raises(OutputExistsError):
        write_imatrix(im, tmp_path / "m.gguf")


def test_sums_are_the_calibration_statistics_diagonal():
    m = make_tiny_llama(vocab_size=1000)
    im = imatrix_from_calibration(m, WINDOWS, progress=False)
    lins = dict(select_linears(m))
    col = StatsCollector(lins)
    with col, torch.no_grad():
        for b in WINDOWS.split(4):
            m(b, use_cache=False)
    imp = importance_for(m, im, list(lins))
    for n in lins:
        diag = col.of(n).xtx.diagonal().double() / col.of(n).n
        torch.testing.assert_close(imp[n].double(), diag, rtol=1e-5, atol=0)


def test_other_files_and_other_models_are_refused(tmp_path, tiny_bpe_tokenizer):
    m = make_tiny_llama(vocab_size=1000)
    llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "model.gguf", format="gguf")
    with pytest.raises(CorruptFileError, match="not an imatrix"):
        read_imatrix(tmp_path / "model.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(CorruptFileError, match="not a GGUF imatrix"):
        read_imatrix(tmp_path / "junk.gguf")
    wide = make_tiny_llama(vocab_size=1000, hidden=96)
    im = imatrix_from_calibration(wide, WINDOWS, progress=False)
    with pytest.raises(CalibrationError, match="another model"):
        importance_for(m, im, [n for n, _ in select_linears(m)])
    other = ImportanceMatrix({"blk.0.foo.weight": np.ones((1, 4))}, {"blk.0.foo.weight": np.ones(1)})
    with pytest.raises(CalibrationError, match="another model"):
        importance_for(m, other, [n for n, _ in select_linears(m)])


def test_cli_writes_an_imatrix(tiny_folder, tmp_path, capsys):
    out = tmp_path / "im.gguf"
    assert cli(["imatrix", "--model", str(tiny_folder), "--calib-samples", "2", "--seq-len", "32", "-o", str(out)]) == 0
    assert "14 weights, 2 x 32 tokens" in capsys.readouterr().out
    assert read_imatrix(out).chunk_count == 2
    assert cli(["imatrix", "--model", str(tiny_folder), "--calib-samples", "2", "--seq-len", "32", "-o", str(out)]) == 2
