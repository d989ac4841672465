import pytest
import torch

from llmquant.errors import TextError
from llmquant.data import EVAL_RESERVED_WINDOWS, default_text, read_text, windows


def test_default_text_protocol():
    t = default_text()
    from pydoc_data.topics import topics

    assert t.startswith(topics[sorted(topics)[0]][:50]) and len(t) > 400_000


def test_calibration_never_overlaps_evaluation():
    ids = torch.arange(113_108)
    ev = windows(ids, EVAL_RESERVED_WINDOWS, 512)
    cal = windows(ids, 128, 512, split="calib")
    assert ev.shape == (40, 512) and cal.shape == (128, 512)
    assert int(ev.max()) < int(cal.min())
    assert int(cal[0, -1]) == 113_107  # from the end backwards
    with pytest.raises(TextError, match="calibration windows"):
        windows(ids, 10_000, 512, split="calib")


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert read_text(tmp_path / "a.txt") == "hello world"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_text(tmp_path / "b.jsonl") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"txt": "one"}\n')
    with pytest.raises(TextError, match="line 1"):
        read_text(tmp_path / "c.jsonl")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(TextError, match="empty"):
        read_text(tmp_path / "e.txt")
    with pytest.raises(TextError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(TextError, match="fewer than one window"):
        windows(torch.arange(100), 8, 512)
