"""Hybrid stacks: the public API, prefill + decode = one pass, cache sizes, save/load, sampling, the encoder."""

from __future__ import annotations

import pytest
import torch

import linattn.models
from linattn.layers import KVCache, RecurrentState
from linattn.models import CausalLM, Encoder, LMConfig, cache_nbytes, generate, sample_next
from tests.ops.tolerance import assert_dtype_close, assert_same_result

EVERY_LAYER = ["linear_attn", "retnet", "gla", "deltanet", "gated_deltanet", "mamba2", "softmax"]


def tiny(layers, **kw) -> LMConfig:
    return LMConfig(vocab_size=61, d_model=32, n_heads=2, layers=layers, **kw)


def ids(B: int, T: int, vocab: int = 61, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_public_api_example():
    cfg = linattn.models.LMConfig(
        vocab_size=256, d_model=128, n_heads=4, layers=["gated_deltanet", "mamba2", "gated_deltanet", "softmax"]
    )
    model = linattn.models.CausalLM(cfg)
    input_ids = ids(2, 21, 256)
    logits = model(input_ids)
    assert logits.shape == (2, 21, 256)
    out = model.generate(input_ids, max_new_tokens=32, temperature=0)
    assert out.shape == (2, 21 + 32) and torch.equal(out[:, :21], input_ids)


@pytest.mark.parametrize(
    "layers",
    [
        EVERY_LAYER,
        ["gated_deltanet", "gated_deltanet", "softmax"],
        [{"type": "softmax", "window": 6, "n_kv_heads": 1}, "mamba2"],
    ],
    ids=["every_layer", "gdn_softmax_hybrid", "windowed_gqa_softmax_mamba2"],
)
def test_prefill_then_decode_equals_one_pass(layers):
    torch.manual_seed(0)
    model = CausalLM(tiny(layers))
    x = ids(2, 45)
    with torch.no_grad():
        ref = CausalLM(tiny(layers)).double()
        ref.load_state_dict(model.state_dict())
        ref_logits = ref(x)
        full = model(x)
        parts, cache = [], None
        for a, b in [(0, 19), (19, 37)] + [(t, t + 1) for t in range(37, 45)]:
            logits, cache = model.forward_with_cache(x[:, a:b], cache)
            parts.append(logits)
    assert_dtype_close(f"{layers} prefill+decode logits", torch.cat(parts, dim=1), full, ref_logits)


def test_greedy_generation_follows_the_full_forward():
    """Each greedy token is the argmax of the one-pass logits of everything before it."""
    torch.manual_seed(1)
    model = CausalLM(tiny(EVERY_LAYER))
    prompt = ids(3, 17, seed=4)
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    with torch.no_grad():
        logits = model(out[:, :-1])
    top2 = logits[:, 16:].topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 1e-4  # skip near-ties, where rounding may pick either
    assert decided.float().mean() > 0.9
    assert torch.equal(logits[:, 16:].argmax(-1)[decided], out[:, 17:][decided])


def test_cache_of_linear_layers_is_constant_and_kv_cache_grows_linearly():
    torch.manual_seed(0)
    linear = CausalLM(tiny(["gated_deltanet", "mamba2", "gla"]))
    hybrid = CausalLM(tiny(["gated_deltanet", "softmax"]))
    sizes, kv = set(), []
    for T in (8, 64, 256):
        sizes.add(generate(linear, ids(1, T), max_new_tokens=2).cache_bytes)
        kv.append(generate(hybrid, ids(1, T), max_new_tokens=2).cache_bytes)
    assert len(sizes) == 1, f"linear layers' cache varies with T: {sorted(sizes)}"
    # the hybrid: a constant gated_deltanet state plus 2 (k, v) x T x 2 heads x 16 channels x 4 bytes
    per_token = 2 * 2 * 16 * 4
    assert kv[1] - kv[0] == (64 - 8) * per_token and kv[2] - kv[1] == (256 - 64) * per_token


def test_cache_holds_one_state_per_layer():
    model = CausalLM(tiny(["gated_deltanet", "softmax", "mamba2"]))
    _, cache = model.forward_with_cache(ids(2, 9))
    assert [type(s) for s in cache] == [RecurrentState, KVCache, RecurrentState]
    assert cache[0].ssm.dtype == torch.float32 and cache[0].ssm.shape == (2, 2, 16, 16)
    assert cache_nbytes(cache) == sum(s.nbytes() for s in cache)


def test_save_then_load_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(["gated_deltanet", {"type": "softmax", "window": 8}, {"type": "linear_attn", "feature_map": "favor+"}])
    model = CausalLM(cfg)
    x = ids(2, 30)
    with torch.no_grad():
        before = model(x)
    model.save(tmp_path / "m.safetensors")
    loaded = CausalLM.load(tmp_path / "m.safetensors")
    assert loaded.cfg == cfg
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    assert loaded.head.weight is loaded.embed.weight  # the tie survives the round trip
    with pytest.raises(ValueError, match="holds a CausalLM, not a Encoder"):
        Encoder.load(tmp_path / "m.safetensors")


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 2.5, -1.0, 1.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits[:3], temperature=0), torch.tensor([1, 1, 1]))
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=gen), torch.ones(4000, dtype=torch.long))
    picked = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(picked.unique().tolist()) == {1, 2}
    # probabilities of the tokens: 1: .53, 2: .32, 4: .07, 0: .03, 3: .01 -> the nucleus of 0.8 is {1, 2}
    picked = sample_next(logits, 1.0, top_p=0.8, generator=gen)
    assert set(picked.unique().tolist()) == {1, 2}
    p = logits[0].softmax(-1)
    freq = torch.bincount(sample_next(logits, 1.0, generator=gen), minlength=5) / 4000
    assert (freq - p).abs().max() < 0.03  # about 4 standard errors
    cold = torch.bincount(sample_next(logits, 0.25, generator=gen), minlength=5) / 4000
    assert cold[1] > 0.85  # a low temperature sharpens towards the argmax
    a = sample_next(logits[:50], 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits[:50], 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_next(logits, 1.0, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be"):
        sample_next(logits, -1.0)


def test_encoder_is_bidirectional_and_packs():
    torch.manual_seed(0)
    enc = Encoder(tiny(["gated_deltanet", "softmax", "mamba2", "linear_attn"]))
    x = ids(1, 25)
    with torch.no_grad():
        h = enc(x)
        x2 = x.clone()
        x2[0, -1] = (x2[0, -1] + 1) % 61
        assert h.shape == (1, 25, 32)
        assert not torch.allclose(h[:, 0], enc(x2)[:, 0])
        cu = torch.tensor([0, 11, 25])
        packed = enc(x, cu)
        separate = torch.cat([enc(x[:, :11]), enc(x[:, 11:])], dim=1)
    assert_same_result("encoder packed", packed, separate)


def test_encoder_with_linformer():
    enc = Encoder(tiny(["softmax", {"type": "linformer", "seq_len": 32, "proj_len": 8}]))
    assert enc(ids(2, 20)).shape == (2, 20, 32)


def test_every_layer_traces_without_a_graph_break():
    """torch.compile(fullgraph=True) traces a stack of every layer type: nothing in the forward reads a tensor on
    the host (dynamo's "eager" backend, so that no compiler runs; the default inductor backend took 5 minutes on
    2 cores for this stack, forward and backward, and matched eager)."""
    model = CausalLM(tiny(EVERY_LAYER))
    x = ids(2, 40)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="the layer names are"):
        tiny(["gated_deltanet", "transformer"])
    with pytest.raises(ValueError, match=r"unknown options \['windo'\]"):
        tiny([{"type": "softmax", "windo": 3}])
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        LMConfig(n_heads=0)
    with pytest.raises(ValueError, match="unknown fields"):
        LMConfig.from_dict({"d_model": 8, "n_layer": 2})
    model = CausalLM(tiny(["softmax"]))
    with pytest.raises(TypeError, match="input_ids must be int64"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=61\)"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        model.generate(ids(1, 3), max_new_tokens=-1)
    with pytest.raises(ValueError, match="at least one prompt token"):
        model.generate(ids(1, 0), max_new_tokens=2)
    with pytest.raises(ValueError, match="needs the options"):
        tiny(["linformer"])
