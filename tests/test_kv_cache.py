"""Preallocated KV caches and masks (issue 16, item 3): the same tokens and log-probs, bit for bit,
as the cache and mask grown by ``torch.cat`` at every token (``generate(preallocate=False)``)."""

import pytest
import torch

from nemo_guide.backends.torch.models import load_adapter
from nemo_guide.backends.torch.sampling import generate
from nemo_guide.backends.torch.tiny import (
    CharTokenizer,
    KVBuffer,
    TinyConfig,
    TinyDecoder,
    decode_positions_and_bias,
    positions_and_attention,
    sampling_step,
)

TEXTS = ["Q:47#31=", "H:#=7a-3b;Q:47#31=", "Q:5+6=", "H:&=2a+b;Q:12&3=", "Q:99-9="]
"""Prompts of 6-18 characters: left padding differs from row to row."""


def _both_paths(step, prompts, *, temperature, top_p=1.0, max_new_tokens=40, seed=1):
    """``(growing, preallocated)``: each ``(tokens [B, L], logprobs [B, L], finished [B])`` padded with -1."""
    out = []
    for preallocate in (False, True):
        responses, finished, logprobs = generate(
            step,
            prompts,
            pad_id=0,
            eos_ids=[2],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=torch.Generator().manual_seed(seed),
            return_logprobs=True,
            preallocate=preallocate,
        )
        width = max(len(r) for r in responses)
        tokens = torch.tensor([r + [-1] * (width - len(r)) for r in responses])
        lps = torch.tensor(
            [lp + [-1.0] * (width - len(lp)) for lp in logprobs], dtype=torch.float32
        )
        out.append((tokens, lps, torch.tensor(finished)))
    return out


def _assert_bit_identical(growing, preallocated):
    for a, b in zip(growing, preallocated, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyDecoder(
        TinyConfig(d_model=32, n_layer=2, n_head=2, d_ff=64, max_seq_len=96)
    ).eval()


@pytest.mark.parametrize("batch", [1, 3, 8, 24])
@pytest.mark.parametrize(
    "temperature, top_p", [(0.0, 1.0), (0.7, 1.0), (1.0, 1.0), (1.0, 0.9)]
)
def test_tiny_preallocated_generation_is_bit_identical(
    tiny_model, batch, temperature, top_p
):
    tok = CharTokenizer()
    prompts = [tok.encode(TEXTS[i % len(TEXTS)]) for i in range(batch)]
    growing, preallocated = _both_paths(
        sampling_step(tiny_model), prompts, temperature=temperature, top_p=top_p
    )
    assert growing[0].shape[1] > 1  # the decode steps ran
    _assert_bit_identical(growing, preallocated)


@pytest.mark.parametrize("batch", [1, 8, 24])
def test_shipped_tiny_preallocated_generation_is_bit_identical(batch):
    """The warm-started built-in policy of the main job, at its sampling temperature."""
    adapter = load_adapter("builtin:tiny", torch.float32, torch.device("cpu"))
    prompts = [adapter.encode(TEXTS[i % len(TEXTS)]) for i in range(batch)]
    growing, preallocated = _both_paths(
        adapter.step(adapter.model), prompts, temperature=1.0, max_new_tokens=64
    )
    _assert_bit_identical(growing, preallocated)


def test_kv_buffer_holds_the_grown_cache(tiny_model):
    """A prefill then two single-token decodes: the buffer's filled views equal the cat-grown
    cache, and the hidden states are equal to those of the growing path."""
    ids = torch.tensor(
        [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]
    )  # [B=2, P=5], row 0 left-padded
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    full = torch.cat([mask, torch.ones(2, 2, dtype=torch.bool)], dim=1)  # [B, 7]
    buffer = KVBuffer(tiny_model.cfg, 2, 7, torch.float32, "cpu")
    with torch.no_grad():
        h_grow, grown = tiny_model(ids, mask)
        h_buf, same = tiny_model(ids, full[:, :5], buffer)
        assert same is buffer and torch.equal(h_grow, h_buf)
        for s, new in ((6, [[13], [14]]), (7, [[15], [16]])):
            h_grow, grown = tiny_model(torch.tensor(new), full[:, :s], grown)
            h_buf, _ = tiny_model(torch.tensor(new), full[:, :s], buffer)
            assert torch.equal(h_grow, h_buf)
    for layer, (k, v) in enumerate(grown):  # each [B, h, 7, dh]
        assert torch.equal(buffer.keys[layer], k) and torch.equal(
            buffer.values[layer], v
        )


def test_decode_mask_hand_computed():
    # Row 0: [pad, pad, a, b, new] -> the new token is the 3rd real one: position 2; it attends
    # to columns 2, 3, 4. Row 1: [a, pad, b, pad, new(pad)] -> 2 real tokens before it, none at
    # it: position 1 (the count up to it, minus 1), and a padded query still sees itself.
    mask = torch.tensor(
        [[False, False, True, True, True], [True, False, True, False, False]]
    )
    positions, bias = decode_positions_and_bias(mask, torch.float32)
    assert positions.tolist() == [[2], [1]]
    inf = float("-inf")
    assert bias.shape == (2, 1, 1, 5)
    assert bias[:, 0, 0].tolist() == [
        [inf, inf, 0.0, 0.0, 0.0],
        [0.0, inf, 0.0, inf, 0.0],
    ]


@pytest.mark.parametrize("seed", range(5))
def test_decode_mask_equals_the_general_one(seed):
    """One new token: the same positions, and a bias that is 0 exactly where the general mask
    attends, over random masks (left padding, holes, an all-padding row, a padded new column)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(6, 11, generator=g) > 0.4  # [B, S]
    mask[0] = False
    mask[1, -1] = False
    positions, attend = positions_and_attention(mask, 1)  # [B, 1], [B, 1, S]
    fast_positions, bias = decode_positions_and_bias(mask, torch.float32)
    assert torch.equal(fast_positions, positions)
    assert torch.equal(bias[:, 0] == 0, attend) and torch.equal(
        bias[:, 0] == float("-inf"), ~attend
    )


def test_kv_buffer_refuses_to_overflow(tiny_model):
    buffer = KVBuffer(tiny_model.cfg, 1, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="holds 3 positions, a forward reached 4"):
        tiny_model(
            torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.bool), buffer
        )


@pytest.mark.parametrize("max_new_tokens", [1, 2])
def test_shortest_generations(tiny_model, max_new_tokens):
    """max_new_tokens=1: the prefill alone (nothing fed back, an empty generated mask)."""
    prompts = [CharTokenizer().encode(t) for t in TEXTS]
    growing, preallocated = _both_paths(
        sampling_step(tiny_model),
        prompts,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
    )
    assert growing[0].shape[1] <= max_new_tokens
    _assert_bit_identical(growing, preallocated)


def _hf_models(tiny_qwen2_dir):
    llama = load_adapter("builtin:tiny-llama", torch.float32, torch.device("cpu"))
    qwen2 = load_adapter(str(tiny_qwen2_dir), torch.float32, torch.device("cpu"))
    return {"tiny-llama": llama, "qwen2": qwen2}


@pytest.mark.parametrize("name", ["tiny-llama", "qwen2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_preallocated_generation_is_bit_identical(tiny_qwen2_dir, name, temperature):
    """Hugging Face Llama (GQA, RoPE) and Qwen2 (QKV bias, tied head): the buffered cache layers
    are in use, and batches 1, 5 and 16 sample the same tokens and log-probs as DynamicCache."""
    pytest.importorskip("transformers")
    from nemo_guide.backends.torch import _hf
    from nemo_guide.backends.torch.hf_cache import preallocated_cache

    if _hf.DynamicLayer is None:
        pytest.skip(
            "this transformers has no per-layer caches: generation keeps its growing cache"
        )
    adapter = _hf_models(tiny_qwen2_dir)[name]
    cache = preallocated_cache(adapter.model, 8)
    assert cache is not None and all(
        type(layer).__name__ == "BufferLayer" for layer in cache.layers
    )
    for batch in (1, 5, 16):
        prompts = [
            adapter.encode(TEXTS[i % len(TEXTS)], add_special_tokens=False)
            for i in range(batch)
        ]
        growing, preallocated = _both_paths(
            adapter.step(adapter.model),
            prompts,
            temperature=temperature,
            max_new_tokens=24,
        )
        _assert_bit_identical(growing, preallocated)
