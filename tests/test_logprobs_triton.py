"""The Triton path of ``fused_logprobs`` against the torch path.

On CPU these run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest) on small shapes that are not multiples of the tile sizes; the ``gpu`` tests
run the compiled kernels at real sizes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from nemo_guide.kernels.logprobs import _pick_impl, fused_logprobs, torch_grad_logits, torch_shard_stats
from nemo_guide.kernels.logprobs_triton import TritonImpl, triton_grad_logits, triton_shard_stats


def inputs(t, v, h, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).mul(0.7).to(device=device, dtype=dtype)
    weight = torch.randn(v, h, generator=g).mul(0.7).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (t,), generator=g).to(device)
    return hidden, weight, targets


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("vocab_start", [0, 40])
def test_shard_stats_match_torch(with_entropy, vocab_start):
    # T=37, V_local=150, H=40: every tile dimension has a ragged edge
    h, w, y = inputs(37, 150, 40)
    y = y + vocab_start - 20  # some targets fall before this shard ...
    y[::5] = vocab_start + 150 + torch.arange(len(y[::5]))  # ... some right after it (ids the last tile's padding covers)
    y = y.clamp(min=0)
    ref = torch_shard_stats(h, w, y, vocab_start, 16, with_entropy, torch.float32)
    got = triton_shard_stats(h, w, y, vocab_start, 16, with_entropy, torch.float32)
    for name, a, b in zip("msat", got, ref, strict=True):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_grad_logits_match_torch():
    h, w, y = inputs(37, 150, 40)
    lse = torch.logsumexp(h @ w.T, -1)
    p = torch.softmax(h @ w.T, -1)
    ent = -(p * p.log()).sum(-1)
    g_lp, g_ent = torch.randn(37), torch.randn(37)
    for g_e in (None, g_ent):
        ref = torch_grad_logits(h, w, y, 0, lse, ent, g_lp, g_e, torch.float32)
        got = triton_grad_logits(h, w, y, 0, lse, ent, g_lp, g_e, torch.float32)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [7, 64])
def test_fused_logprobs_triton_equals_torch_forward_and_backward(chunk):
    h, w, y = inputs(37, 150, 40)
    coef = torch.randn(37)
    outs = {}
    for impl in ("torch", "triton"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        lp, ent = fused_logprobs(hh, ww, y, chunk_size=chunk, return_entropy=True, impl=impl)
        ((lp * coef).sum() + 0.3 * ent.sum()).backward()
        outs[impl] = (lp.detach(), ent.detach(), hh.grad, ww.grad)
    for name, a, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), outs["triton"], outs["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=name)


def reference64(hidden, weight, targets):
    """Log-probs of ``targets`` in float64 from the same inputs. Shape: ``[T]``."""
    logp = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def test_bf16_inputs():
    h, w, y = inputs(20, 70, 32, dtype=torch.bfloat16)
    ref = fused_logprobs(h, w, y, impl="torch")
    got = fused_logprobs(h, w, y, impl="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
    # both against float64 math on the same bf16 values (exact products, float32 accumulation)
    want = reference64(h, w, y)
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-6)


def test_float64_is_refused_on_triton(monkeypatch):
    monkeypatch.delenv("NEMO_GUIDE_LOGPROBS_IMPL", raising=False)
    h, w, y = inputs(5, 9, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="the triton path computes in float32; use impl='torch' for float64 inputs"):
        fused_logprobs(h, w, y, impl="triton")
    got = fused_logprobs(h, w, y)  # auto: torch, which keeps float64
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference64(h, w, y), atol=1e-12, rtol=1e-12)
    monkeypatch.setenv("NEMO_GUIDE_LOGPROBS_IMPL", "cuda-magic")
    with pytest.raises(ValueError, match="impl = 'cuda-magic': choose one of auto, torch, triton .*NEMO_GUIDE_LOGPROBS_IMPL"):
        fused_logprobs(h, w, y)


def test_auto_is_torch_and_triton_is_opt_in(monkeypatch):
    # auto does not look at the device: Triton waits for a GPU benchmark showing it faster
    monkeypatch.delenv("NEMO_GUIDE_LOGPROBS_IMPL", raising=False)
    assert _pick_impl("auto", torch.float32).name == "torch"
    assert _pick_impl("auto", torch.bfloat16).name == "torch"
    assert _pick_impl("triton", torch.float32).name == "triton"
    monkeypatch.setenv("NEMO_GUIDE_LOGPROBS_IMPL", "triton")
    assert _pick_impl("auto", torch.bfloat16).name == "triton"
    assert _pick_impl("torch", torch.bfloat16).name == "torch"  # an explicit impl wins over the environment


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_size", [896, 3584])
def test_gpu_triton_matches_torch_at_real_sizes(hidden_size):
    h, w, y = inputs(2048, 151936, hidden_size, dtype=torch.bfloat16, device="cuda")
    h.mul_(0.05)
    w.mul_(0.05)
    res = {}
    for impl in ("torch", "triton"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        lp, ent = fused_logprobs(hh, ww, y, chunk_size=1024, return_entropy=True, impl=impl)
        (lp.sum() + 0.1 * ent.sum()).backward()
        res[impl] = (lp.detach(), ent.detach(), hh.grad.float(), ww.grad.float())
    for name, a, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), res["triton"], res["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.gpu
def test_gpu_auto_stays_on_torch(monkeypatch):
    monkeypatch.delenv("NEMO_GUIDE_LOGPROBS_IMPL", raising=False)
    h, w, y = inputs(16, 70, 32, dtype=torch.bfloat16, device="cuda")
    calls = []
    monkeypatch.setattr(TritonImpl, "shard_stats", staticmethod(lambda *a: calls.append("triton") or triton_shard_stats(*a)))
    fused_logprobs(h, w, y)
    assert calls == []
    fused_logprobs(h, w, y, impl="triton")
    assert calls == ["triton"]
