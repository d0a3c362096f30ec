import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_cpu import free_port

from nemo_guide.kernels.logprobs import fused_logprobs


def _naive(hidden, weight, targets):
    """Reference log-probs and entropies from full logits (float32, or float64 for float64 inputs)."""
    logits = hidden @ weight.T
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


@pytest.mark.parametrize("t,chunk", [(1, 4), (13, 4), (16, 16), (37, 1024), (0, 8)])
def test_matches_naive_forward_and_backward(t, chunk):
    torch.manual_seed(t)
    h = torch.randn(t, 24, requires_grad=True)
    w = torch.randn(50, 24, requires_grad=True)
    y = torch.randint(0, 50, (t,))
    lp, ent = fused_logprobs(h, w, y, chunk_size=chunk, return_entropy=True)
    ref_lp, ref_ent = _naive(h, w, y)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    if t == 0:
        return
    g1, g2 = torch.randn(t), torch.randn(t)
    got = torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), (h, w))
    want = torch.autograd.grad((ref_lp * g1).sum() + (ref_ent * g2).sum(), (h, w))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(0)
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    assert torch.autograd.gradcheck(lambda a, b: fused_logprobs(a, b, y, chunk_size=2, return_entropy=True), (h, w))


def test_bf16_inputs_give_float32_and_grads_in_input_dtype():
    h = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 11, (6,))
    lp = fused_logprobs(h, w, y, chunk_size=4)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # values: float64 math on the same (bf16-representable) inputs. The products of bf16 numbers
    # are exact in float32, so the log-probs agree to float32 rounding; the gradients are
    # rounded to bf16 (8 significant bits) on return.
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref, _ = _naive(h64, w64, y)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-5)
    ref.sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=8e-3, atol=1e-3)


def test_shape_and_dtype_checks_always_run():
    with pytest.raises(ValueError, match=r"\[V_local, H\]"):
        fused_logprobs(torch.randn(2, 3), torch.randn(5, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"targets must have shape \[T\] = \[2\], got \(3,\)"):
        fused_logprobs(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.float32"):
        fused_logprobs(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        fused_logprobs(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), chunk_size=0)


def test_target_range_check_needs_the_debug_switch(monkeypatch):
    h, w, bad = torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 5])
    monkeypatch.delenv("NEMO_GUIDE_DEBUG_CHECKS", raising=False)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 5\); got range \[0, 5\]"):
        fused_logprobs(h, w, bad, debug_checks=True)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 5\); got range \[-1, 1\]"):
        fused_logprobs(h, w, torch.tensor([-1, 1]), debug_checks=True)
    assert fused_logprobs(h, w, bad).shape == (2,)  # off by default: not detected
    monkeypatch.setenv("NEMO_GUIDE_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 5\)"):
        fused_logprobs(h, w, bad)
    assert fused_logprobs(h, w, bad, debug_checks=False).shape == (2,)  # the keyword wins over the environment


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def _count_host_syncs(monkeypatch) -> list[str]:
    """Patch every Tensor method that reads a value back to the host; returns the list of calls."""
    calls: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append("torch.nonzero") or original_nonzero(*a, **k))
    return calls


@pytest.mark.parametrize("return_entropy", [False, True])
def test_no_host_sync_without_debug_checks(monkeypatch, return_entropy):
    monkeypatch.delenv("NEMO_GUIDE_DEBUG_CHECKS", raising=False)
    h = torch.randn(9, 6, requires_grad=True)
    w = torch.randn(11, 6, requires_grad=True)
    y = torch.randint(0, 11, (9,))
    calls = _count_host_syncs(monkeypatch)
    out = fused_logprobs(h, w, y, chunk_size=4, return_entropy=return_entropy)
    loss = sum(o.sum() for o in out) if return_entropy else out.sum()
    torch.autograd.backward(loss)
    assert calls == []
    fused_logprobs(h, w, y, chunk_size=4, debug_checks=True)
    assert calls == ["__bool__"]  # the range check: exactly one sync, and only when asked for


def _tp_worker(rank, world, port, queue, impl):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same full tensors on every rank
        h = torch.randn(19, 16)
        w = torch.randn(40, 16)
        y = torch.randint(0, 40, (19,))
        g1, g2 = torch.randn(19), torch.randn(19)
        shard = w.chunk(world)[rank].clone().requires_grad_(True)
        h_local = h.clone().requires_grad_(True)
        lp, ent = fused_logprobs(h_local, shard, y, tp_group=dist.group.WORLD, chunk_size=5, return_entropy=True, impl=impl)
        ((lp * g1).sum() + (ent * g2).sum()).backward()
        hf, wf = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref_lp, ref_ent = _naive(hf, wf, y)
        ((ref_lp * g1).sum() + (ref_ent * g2).sum()).backward()
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_local.grad, hf.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shard.grad, wf.grad.chunk(world)[rank], rtol=1e-4, atol=1e-5)
        queue.put((rank, "ok"))
    except Exception as exc:  # report to the parent, which asserts
        queue.put((rank, repr(exc)))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_vocab_parallel_gloo_matches_full_vocabulary(world, impl):
    if impl == "triton":
        pytest.importorskip("triton")  # on CPU its interpreter (TRITON_INTERPRET=1, inherited by the workers)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_tp_worker, args=(world, free_port(), queue, impl), nprocs=world, start_method="spawn")
    results = dict(queue.get() for _ in range(world))
    assert results == {r: "ok" for r in range(world)}
