"""What the distributed tests run, shared by the test (one process) and tests/dist_worker.py (each rank)."""

import torch

import llmquant
from llmquant import CalibSpec, QuantConfig, QuantScheme
from llmquant.flows import distributed
from llmquant.schemes import Plan

VOCAB = 1000
ONE = CalibSpec(batch_size=1)  # six batches of one window: three per rank
CASES = {
    "gptq": QuantConfig(weight="W3G32", method="gptq", calibration=ONE),
    "awq": QuantConfig(weight="W4G32", method="awq", calibration=ONE),
    "awq_gptq": QuantConfig(weight="W3G32", method=["awq", "gptq"], calibration=ONE),
    "static": QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="tensor"), method="static",
                          observer="mse"),
    "smoothquant": QuantConfig(method="smoothquant"),
    # an AWQ plan: one scale per shared input searched with each linear on its own format
    "awq_plan": QuantConfig(method="plan", calibration=ONE, method_params=Plan.from_layers(
        {"re:.*self_attn\\.(q|k|v)_proj": "W8", "re:.*layers.*": "W4G32"}, method="awq")),
}


def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(1))


def qat_run(ckpt, steps=3, load_sharded=False, save=None, config="W4G32", **kw):
    """A few QAT steps on the tiny model: (losses, trained state). ``load_sharded``: loaded with
    ``shard=True`` (each rank reads its own rows); ``save``: converted and saved there (by the writer)."""
    m, tok = llmquant.load_model(ckpt, shard=load_sharded)
    res = llmquant.train_qat(m, None, config=config, tokenizer=tok, steps=steps, batch=2, seq_len=32, lr=1e-3,
                             progress=False, convert=save is not None, **kw)
    if save is not None and distributed.is_writer():
        llmquant.save(m, tok, save)
    return res.losses, {k: v.clone() for k, v in m.state_dict().items()}
