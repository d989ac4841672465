import pytest
import torch.nn as nn

import llmquant
from llmquant.errors import SelectionError
from llmquant.modules import QuantLinear, select_linears

from conftest import make_tiny_llama


def test_default_leaves_lm_head_and_embeddings():
    m = make_tiny_llama()
    s = llmquant.quantize(m, llmquant.QuantConfig(weight="W4G64", head="fp32"), progress=False)
    assert len(s.layers) == 2 * 7
    assert isinstance(m.lm_head, nn.Linear) and not isinstance(m.lm_head, QuantLinear)
    assert isinstance(m.model.embed_tokens, nn.Embedding)
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_targets_by_name_and_regex():
    m = make_tiny_llama()
    names = [n for n, _ in select_linears(m, ["re:.*mlp\\..*", "model.layers.0.self_attn.q_proj"], ["re:.*down_proj"])]
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_selection_errors():
    m = make_tiny_llama()
    with pytest.raises(SelectionError, match="do not exist"):
        select_linears(m, ["model.layers.9.mlp.up_proj"])
    with pytest.raises(SelectionError, match="matches"):
        select_linears(m, ["re:nothing.*"])
    with pytest.raises(SelectionError, match="bad regex"):
        select_linears(m, ["re:(("])


def test_plain_module():
    m = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    s = llmquant.quantize(m, "W8", progress=False)
    assert [l.name for l in s.layers] == ["0", "2"] and all(l.sqnr_db > 38 for l in s.layers)


def test_nan_weights_refused():
    from llmquant.errors import InvalidWeightsError

    m = nn.Sequential(nn.Linear(8, 8))
    m[0].weight.data[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match="NaN"):
        llmquant.quantize(m, "W8", progress=False)
