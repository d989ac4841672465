import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (torch, numpy, random): its unseeded draws (inputs,
    weights, calibration data) do not depend on which tests ran before it, so a tolerance that holds, holds."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_model_and_tokenizer():
    import llmquant

    return llmquant.load_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_and_tokenizer):
    return default_model_and_tokenizer[1]


def make_tiny_llama(vocab_size=49152, hidden=72, seed=0, tie=True, layers=2, intermediate=160, heads=4, kv_heads=2):
    """A tiny random Llama: width 72 is not a multiple of 32/64/128, so groups are ragged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the 0.02-std init, so quantization error is visible in logits
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """A local Hugging Face folder holding a tiny model and the default tokenizer."""
    m = make_tiny_llama()
    d = tmp_path / "tiny"
    m.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer with 400 tokens (trained in a blink on the default text), so tests that
    convert tokenizers (GGUF) stay fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmquant.data import default_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([default_text()[:20000]], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine run far faster on one thread (no OpenMP spin-waits or thread
    hand-offs); modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- shared by the method tests: constructed layers and a tiny model with calibration ids ------------------
def correlated_inputs(n=3000, k=100, seed=0):
    """Inputs whose features are correlated (what GPTQ and AutoRound exploit)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    return torch.randn(n, k, generator=g) @ mix + 0.05 * torch.randn(n, k, generator=g)


def out_err(x, w, q, scale, zero, scheme):
    """Mean squared output error of the quantized weight against ``w`` on inputs ``x``."""
    from llmquant.schemes import dequantize

    return float((x @ (dequantize(q, scale, zero, scheme) - w).T).pow(2).mean())


def calib_ids(n, seq_len, vocab=1000, seed=1):
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    """A two-layer tiny Llama with a 1000-token vocabulary (one per test module)."""
    return make_tiny_llama(vocab_size=1000, layers=2)
