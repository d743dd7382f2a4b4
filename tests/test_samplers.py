"""Sampler checks at full size and at scale, and smoke runs of the sampling and training benchmarks.

The notebooks (05_models, 08_samplers) test every piece on tiny models; these tests repeat the key claims on
the benchmark-size model (6 layers, width 512, 8 heads) and on more sequences than a notebook should spend
time on.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from kelly.models import IncrementalDecoder, MusicTransformer, TransformerConfig
from kelly.samplers import generate
from kelly.tokenizer import Tokenizer, TokenizerConfig

FULL_SIZE = dict(n_layers=6, width=512, n_heads=8, vocab_size=512, dropout=0.0, max_len=64)


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return MusicTransformer(TransformerConfig(**FULL_SIZE)).eval()


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(top_k=50, top_p=0.95), dict(temperature=0.8, top_k=0, top_p=0.9, repetition_penalty=1.1)],
                         ids=["greedy", "topk50-topp095", "temp-topp-penalty"])
def test_cached_equals_full_recomputation_full_size(full_model, settings):
    "The KV-cached decoder and full recomputation give identical tokens on the benchmark-size model, past max_len."
    kw = dict(prompt=[[1, 2, 3, 4], [9, 8, 7, 6]], max_new_tokens=80, seed=0, **settings)
    cached = generate(full_model, use_cache=True, **kw)
    full = generate(full_model, use_cache=False, **kw)
    assert torch.equal(cached.ids, full.ids)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_decoder_step_matches_forward_full_size(full_model, splits):
    with torch.inference_mode():
        ids = torch.randint(0, FULL_SIZE["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
        ref = full_model(ids)
        dec, cache = IncrementalDecoder(full_model, splits=splits), full_model.new_cache(3, 40)
        dec.prefill(ids[:, :1], cache)
        steps = torch.stack([dec.step(ids[:, t], cache) for t in range(1, 40)], 1)
    torch.testing.assert_close(steps, ref[:, 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("at_end", [False, True], ids=["specials-first", "specials-at-end"])
def test_constrained_generation_always_valid(at_end):
    "32 sequences of 256 tokens from an untrained model (near-uniform guesses): every one valid under the grammar."
    tok = Tokenizer(TokenizerConfig(special_tokens_at_end=at_end))
    torch.manual_seed(0)
    model = MusicTransformer(TransformerConfig.for_tokenizer(tok, n_layers=2, width=64, n_heads=4, max_len=64)).eval()
    out = generate(model, tok, n=32, max_new_tokens=256, seed=0, stop_at_eos=False, temperature=1.5)
    assert all(tok.grammar.is_valid(s) for s in out.sequences())
    assert out.ids.shape == (32, 257)
    free = generate(model, tok, n=32, max_new_tokens=256, seed=0, stop_at_eos=False, temperature=1.5, constrained=False)
    assert np.mean([tok.grammar.validity(s) for s in free.sequences()]) < 0.9   # the constraint is doing the work


def _run(args, timeout=900):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.mark.slow
def test_bench_sampler_smoke():
    "The sampling benchmark runs end to end (short lengths, kelly only, no transformers needed) and prints its summary."
    out = _run(["bench/bench_sampler.py", "--quick", "--no-hf", "--repeats", "1"])
    assert "# summary" in out and "cache speedup" in out and "constraint overhead" in out


@pytest.mark.slow
def test_bench_train_smoke():
    out = _run(["bench/bench_train.py", "--steps", "1", "--warmup", "0"])
    assert '"loop": "plain"' in out and "pct_peak" in out
