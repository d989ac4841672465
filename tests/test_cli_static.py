"""``llmquant quantize --method static|smoothquant``: calibrated W8A8 from the command line; bad calibration
input is one line on stderr, exit 2, and nothing written."""

import pytest
import torch

import llmquant
from llmquant import QuantConfig, QuantScheme
from llmquant.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(llmquant.data.default_text()[-30000:])
    return p


def test_smoothquant_cli_saves_what_the_api_makes(tmp_path, tiny_folder, calib_file, capsys):
    out = tmp_path / "q"
    rc, o, err = run(capsys, "quantize", "--model", str(tiny_folder), "--method", "smoothquant", "--observer", "percentile",
                     "--calib", str(calib_file), "--calib-samples", "3", "--seq-len", "32", "--alpha", "0.6", "-o", str(out))
    assert rc == 0, err
    assert "int8-ch" in o and ("int8_int_mm" in o or "fbgemm_int8" in o)
    m, tok = llmquant.load(out)
    assert m.llmquant_config.smooth_alpha == 0.6 and m.llmquant_config.observer == "percentile"
    # the same job through the Python API gives bit-identical logits
    ref, _ = llmquant.load_model(str(tiny_folder))
    cfg = QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="tensor"), method="smoothquant",
                      observer="percentile", smooth_alpha=0.6)
    llmquant.quantize_static(ref, cfg, tok, calib_file.read_text(), samples=3, seq_len=32, progress=False)
    ids = torch.arange(30)[None] * 11 % 1000
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)


@pytest.mark.parametrize(
    "extra,pattern",
    [
        (["--calib", "EMPTY", "--seq-len", "32"], "empty"),
        (["--calib-samples", "500", "--seq-len", "64"], "room for"),
        (["--seq-len", "100000"], "longer than the model's context"),
        (["--observer", "nope"], "unknown observer"),
    ],
)
def test_bad_calibration_input_writes_nothing(tmp_path, tiny_folder, calib_file, capsys, extra, pattern):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    if "--calib" not in extra:
        extra = ["--calib", str(calib_file), *extra]
    out = tmp_path / "q"
    rc, _, err = run(capsys, "quantize", "--model", str(tiny_folder), "--method", "static", *extra, "-o", str(out))
    assert rc == 2 and "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("llmquant: error")]
    assert len(lines) == 1 and pattern in lines[0], err
    assert not out.exists() and not any(p.name.startswith(".q") for p in tmp_path.iterdir())
