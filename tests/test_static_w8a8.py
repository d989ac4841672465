"""prepare / calibrate / convert: a plain MLP and a tiny Llama; static W8A8 against its reference path;
SmoothQuant leaves the float model unchanged; save -> load bit-identical; bad inputs fail clearly."""

import copy

import pytest
import torch
import torch.nn as nn

import llmquant
from llmquant import QuantConfig, QuantLinear, QuantScheme
from llmquant.errors import CalibrationError, MappingError, SchemeError, TextError
from llmquant.flows.smooth import SmoothingStats, smooth, smoothing_pairs
from llmquant.schemes import sqnr_db

from conftest import make_tiny_llama

A8 = QuantScheme(bits=8, granularity="tensor")
STATIC = QuantConfig(weight="W8", activation=A8, method="static")

W8A8_KERNELS = ("int8_int_mm", "fbgemm_int8")  # which one runs depends on the CPU (fbgemm first on x86)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse", "histogram"])
def test_prepare_convert_plain_mlp(observer):
    """PyTorch's eager-mode example: a 784-input MLP calibrated with random inputs."""
    m = mlp()
    x = torch.rand(256, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
    cfg = STATIC.with_(observer=observer, ignore=())
    llmquant.prepare(m, cfg)
    with torch.no_grad():
        assert torch.equal(m(x[:128]), ref[:128])  # observers do not change outputs
        m(x[128:])
    s = llmquant.convert(m, progress=False)
    assert len(s.layers) == 3 and all(isinstance(m[i], QuantLinear) for i in (1, 3, 5))
    assert not any(hasattr(mod, "llmquant_input_observer") for mod in m.modules())
    assert m[1].input_scale.item() > 0 and s.kernels[0] in W8A8_KERNELS
    with torch.no_grad():
        y = m(x)
    assert sqnr_db(ref, y) > 20  # int8 weights and activations (per tensor) on a random MLP
    assert m.llmquant_config.observer == observer


def test_static_w8a8_matches_its_reference_path():
    m = mlp()
    llmquant.prepare(m, STATIC.with_(ignore=(), activation=QuantScheme(bits=8, granularity="tensor", symmetric=False)))
    with torch.no_grad():
        m(torch.rand(64, 784))
    llmquant.convert(m, progress=False)
    for batch in (1, 5, 64):  # small batches and large, all through torch._int_mm's shape rules
        x = torch.rand(batch, 784) * 1.5
        with torch.no_grad():
            y = m(x)
            llmquant.kernels.set_kernel(m, "reference")
            yr = m(x)
            llmquant.kernels.set_kernel(m, None)
        assert (y - yr).abs().max() <= 1e-4 * yr.abs().max()


def test_weight_only_and_dynamic_configs_need_no_input_observer():
    m = mlp()
    llmquant.prepare(m, QuantConfig(weight="W8", ignore=(), weight_observer="mse"))
    assert not any(hasattr(mod, "llmquant_input_observer") for mod in m.modules())
    s = llmquant.convert(m, progress=False)
    assert s.kernels[0] not in W8A8_KERNELS and m[1].activation_scheme is None and s.mean_sqnr_db > 38
    m = mlp()
    llmquant.prepare(m, QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="token", dynamic=True), ignore=()))
    assert not any(hasattr(mod, "llmquant_input_observer") for mod in m.modules())
    assert llmquant.convert(m, progress=False).kernels[0] in W8A8_KERNELS


def test_convert_can_read_histograms_as_another_observer():
    m = mlp()
    llmquant.prepare(m, STATIC.with_(observer="histogram", ignore=()))
    with torch.no_grad():
        m(torch.rand(64, 784))
    m2 = copy.deepcopy(m)
    llmquant.convert(m, observer="percentile:99", progress=False)
    llmquant.convert(m2, observer="minmax", progress=False)
    assert m.llmquant_config.observer == "percentile:99"
    assert m[3].input_scale.item() < m2[3].input_scale.item()


def test_smoothquant_leaves_the_float_model_unchanged():
    m = make_tiny_llama()
    ids = torch.randint(0, 1000, (2, 48))
    with torch.no_grad():
        ref = m(ids).logits
        # outlier channels in the residual stream, as real LLMs have
        m.model.layers[0].input_layernorm.weight[[3, 17]] *= 30
        m.model.layers[1].post_attention_layernorm.weight[[5]] *= 30
        ref = m(ids).logits
    pairs = smoothing_pairs(m)
    assert len(pairs) == 2 * 3  # per layer: input norm -> qkv, post-attention norm -> gate/up, up -> down
    stats = SmoothingStats(m, pairs)
    with torch.no_grad():
        m(ids)
    before = stats.absmax("model.layers.0.input_layernorm").clone()
    factors = smooth(m, stats, alpha=0.5)
    with torch.no_grad():
        out = m(ids).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    s = factors["model.layers.0.input_layernorm"]
    assert s[3] > 3 * s.median() and s[17] > 3 * s.median()  # outlier channels are scaled down most
    assert not any(mod._forward_pre_hooks for mod in m.modules())
    # after smoothing the activation outliers are smaller relative to the rest
    stats2 = SmoothingStats(m, pairs)
    with torch.no_grad():
        m(ids)
    after = stats2.absmax("model.layers.0.input_layernorm")
    assert after.max() / after.median() < before.max() / before.median()


def test_smoothquant_helps_static_w8a8_on_outlier_channels():
    base = make_tiny_llama()
    with torch.no_grad():
        for layer in base.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40
    ids = torch.randint(0, 1000, (4, 48))
    with torch.no_grad():
        ref = base(ids).logits
    errs = {}
    for alpha in (None, 0.5):
        m = copy.deepcopy(base)
        if alpha is not None:
            stats = SmoothingStats(m, smoothing_pairs(m))
            with torch.no_grad():
                m(ids)
            smooth(m, stats, alpha)
        llmquant.prepare(m, STATIC)
        with torch.no_grad():
            m(ids)
        llmquant.convert(m, progress=False)
        with torch.no_grad():
            errs[alpha] = sqnr_db(ref, m(ids).logits)
    assert errs[0.5] > errs[None] + 3


def test_no_mapping_is_a_clear_error():
    with pytest.raises(MappingError, match="Sequential.*arch=llmquant.models.ArchSpec"):
        smoothing_pairs(mlp())


def test_quantize_static_on_text_and_save_load_bit_identical(tmp_path, tokenizer):
    m = make_tiny_llama()
    text = llmquant.data.default_text()[-20000:]
    cfg = STATIC.with_(observer="percentile", smooth_alpha=0.5, method="smoothquant")
    s = llmquant.quantize_static(m, cfg, tokenizer, text, samples=4, seq_len=64, progress=False)
    assert len(s.layers) == 14 and s.kernels[0] in W8A8_KERNELS
    ids = torch.arange(40)[None] * 7 % 1000
    with torch.no_grad():
        before = m(ids).logits
    llmquant.save(m, tokenizer, tmp_path / "q")
    m2, _ = llmquant.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, before)
    assert m2.llmquant_config == cfg
    assert QuantConfig.from_json(cfg.to_json()) == cfg


def test_bad_calibration_inputs(tokenizer):
    m = make_tiny_llama()
    w_before = m.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(TextError, match="empty"):
        llmquant.quantize_static(m, STATIC, tokenizer, "   ", samples=2, seq_len=32)
    with pytest.raises(TextError, match="room for|fewer than one window"):
        llmquant.quantize_static(m, STATIC, tokenizer, "a short text", samples=2, seq_len=32)
    with pytest.raises(TextError, match="room for 2 calibration windows of 64 tokens.*100 asked"):
        llmquant.quantize_static(m, STATIC, tokenizer, "word " * 200, samples=100, seq_len=64)
    with pytest.raises(CalibrationError, match="longer than the model's context"):
        llmquant.quantize_static(m, STATIC, tokenizer, None, samples=2, seq_len=4096)
    with pytest.raises(CalibrationError, match="positive integer"):
        llmquant.quantize_static(m, STATIC, tokenizer, None, samples=0, seq_len=32)
    with pytest.raises(SchemeError, match="unknown observer"):
        llmquant.quantize_static(m, STATIC.with_(observer="nope"), tokenizer, None, samples=2, seq_len=32)
    with pytest.raises(SchemeError, match="per tensor"):
        llmquant.prepare(m, STATIC.with_(activation=QuantScheme(bits=8, granularity="token")))
    # nothing was changed by the failures above
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, w_before)
    assert all(type(mod) is not QuantLinear for mod in m.modules())
    with torch.no_grad():  # NaN in activations: a clear error naming the layer, and the observers are removed
        m.model.layers[1].input_layernorm.weight[0] = float("nan")
    with pytest.raises(CalibrationError, match="NaN/Inf.*layers.1.self_attn.q_proj"):
        llmquant.quantize_static(m, STATIC, tokenizer, None, samples=2, seq_len=32, progress=False)
    assert getattr(m, "llmquant_prepared", None) is None and not any(mod._forward_pre_hooks for mod in m.modules())


def test_convert_errors():
    m = mlp()
    with pytest.raises(CalibrationError, match="not prepared"):
        llmquant.convert(m)
    llmquant.prepare(m, STATIC.with_(ignore=()))
    with pytest.raises(CalibrationError, match="already prepared"):
        llmquant.prepare(m, STATIC)
    with pytest.raises(CalibrationError, match="saw no data"):
        llmquant.convert(m)
    assert all(type(mod) is not QuantLinear for mod in m.modules())  # nothing replaced


def test_alpha_search_beats_no_smoothing_on_outlier_channels():
    from llmquant.algorithms.smoothquant import _rtn_int8_rows, search_alpha

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, [5, 40]] *= 60  # outlier input channels
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)

    def fq(v):  # per-tensor int8, min-max
        s = v.abs().max() / 127.5
        return (v / s).round().clamp(-128, 127) * s

    best, errs = search_alpha(x, x.abs().amax(0), [lin], (0.2, 0.5, 0.8), fq)
    w = lin.weight.detach()
    plain = float((fq(x) @ _rtn_int8_rows(w).t() - x @ w.t()).pow(2).sum())
    assert best in (0.2, 0.5, 0.8) and min(errs) == errs[(0.2, 0.5, 0.8).index(best)]
    assert min(errs) < 0.3 * plain


def test_smooth_with_alpha_search_keeps_the_float_model():
    m = make_tiny_llama(layers=1)
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        ref = m(ids).logits
    stats = SmoothingStats(m, smoothing_pairs(m), keep_samples=1)
    with torch.no_grad():
        m(ids)
    smooth(m, stats, "search", observer="minmax")
    assert set(stats.chosen_alphas.values()) <= {0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9} and len(stats.chosen_alphas) == 3
    with torch.no_grad():
        assert (m(ids).logits - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_convert_rederives_with_another_argument():
    m = mlp()
    llmquant.prepare(m, STATIC.with_(observer="percentile:99.99", ignore=()))
    with torch.no_grad():
        m(torch.rand(64, 784))
    m2 = copy.deepcopy(m)
    llmquant.convert(m, progress=False)
    llmquant.convert(m2, observer="percentile:90", progress=False)
    assert m2[3].input_scale.item() < m[3].input_scale.item()


def _tiny(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":  # Conv1D weights (in, out), LayerNorm with bias
        cfg = tf.GPT2Config(vocab_size=500, n_positions=64, n_embd=48, n_layer=2, n_head=4)
        return tf.GPT2LMHeadModel(cfg).eval()
    if kind == "opt":
        cfg = tf.OPTConfig(vocab_size=500, hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=48)
        return tf.OPTForCausalLM(cfg).eval()
    cfg = tf.Qwen2Config(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "opt", "qwen2"])
def test_smoothquant_other_architectures_unchanged(kind):
    m = _tiny(kind)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ("ln" in n or "norm" in n or "layer_norm" in n) and p.dim() == 1:
                p.uniform_(0.5, 3.0)  # non-trivial norm weights and biases
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        ref = m(ids).logits
    stats = SmoothingStats(m, smoothing_pairs(m))
    with torch.no_grad():
        m(ids)
    smooth(m, stats, 0.5)
    with torch.no_grad():
        out = m(ids).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_one_pass_smoothquant_minmax_equals_two_passes(tokenizer):
    """quantize_static gets min-max scales of the smoothed model from the unsmoothed pass (exact math)."""
    ref = make_tiny_llama(layers=1)
    text = llmquant.data.default_text()[-20000:]
    cfg = STATIC.with_(observer="minmax", smooth_alpha=0.8)
    a = copy.deepcopy(ref)
    llmquant.quantize_static(a, cfg, tokenizer, text, samples=3, seq_len=48, progress=False)
    # two explicit passes: statistics, smoothing, then calibrate the smoothed model
    b = copy.deepcopy(ref)
    wins = llmquant.data.calibration_windows(tokenizer, text, 3, 48)
    stats = SmoothingStats(b, smoothing_pairs(b))
    llmquant.calibrate(b, windows=wins, progress=False)
    smooth(b, stats, 0.8)
    llmquant.prepare(b, cfg)
    llmquant.calibrate(b, windows=wins, progress=False)
    llmquant.convert(b, progress=False)
    sa = [m.input_scale.item() for m in a.modules() if isinstance(m, QuantLinear)]
    sb = [m.input_scale.item() for m in b.modules() if isinstance(m, QuantLinear)]
    assert len(sa) == 7 and sa == pytest.approx(sb, rel=1e-5)


def test_smoothquant_with_a_given_arch_on_an_unknown_family(tokenizer):
    """A family llmquant has no record of: quantize_static(..., arch=ArchSpec(...)) gives its pairs, and
    the result is what the built-in record gives for the same layout."""
    import copy

    from llmquant.models import ArchSpec, arch_for

    from conftest import make_tiny_llama

    base = make_tiny_llama(layers=2)
    ids = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="smoothquant")
    known = copy.deepcopy(base)
    llmquant.quantize_static(known, cfg, windows=ids, progress=False)
    unknown = copy.deepcopy(base)
    unknown.config.model_type = "mystery"
    assert arch_for(unknown) is None
    spec = ArchSpec(model_types=("mystery",), norm_to_linears=arch_for(base).norm_to_linears,
                    linear_to_linears=arch_for(base).linear_to_linears)
    llmquant.quantize_static(unknown, cfg, windows=ids, arch=spec, progress=False)
    a, b = known.state_dict(), unknown.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
