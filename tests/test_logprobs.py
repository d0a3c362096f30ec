import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_cpu import free_port

from nemo_guide.kernels import chunking
from nemo_guide.kernels import logprobs as lp_module
from nemo_guide.kernels.chunking import chunk_for_budget, chunk_rows, row_blocks
from nemo_guide.kernels.logprobs import fused_logprobs, grad_logits_, shard_stats


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
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1 \(or None: chosen from memory_budget\), got 0"):
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


def _fwd_bwd(h, w, y, g1, g2, **kw):
    """Outputs and (hidden, weight) gradients of ``sum(lp * g1) (+ sum(ent * g2))``, on fresh leaves."""
    hh, ww = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    out = fused_logprobs(hh, ww, y, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    loss = (outs[0] * g1).sum() + ((outs[1] * g2).sum() if len(outs) == 2 else 0)
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, (hh, ww)))


def _count_logits(monkeypatch) -> list[int]:
    """Patch ``shard_logits`` (every ``[C, H] x [H, V]`` product of logits); returns the rows of each call."""
    calls: list[int] = []
    original = lp_module.shard_logits
    monkeypatch.setattr(lp_module, "shard_logits", lambda h, w, d: calls.append(h.shape[0]) or original(h, w, d))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("chunk", [None, 29, 64, 10, 1])
def test_kept_first_chunk_equals_recompute_bit_for_bit(monkeypatch, dtype, return_entropy, chunk):
    """The backward reuses the forward's logits of the first chunk (with one chunk: no product
    of logits in the backward at all) and gives exactly the values and gradients of the
    backward that recomputes every chunk."""
    monkeypatch.setattr(chunking, "BLOCK_BYTES", 3 * 101 * 8)  # blocks of 3 rows (6 in float32): 29 = 9*3 + 2
    torch.manual_seed(1)
    h, w = torch.randn(29, 24, dtype=dtype), torch.randn(101, 24, dtype=dtype)
    y, g1, g2 = torch.randint(0, 101, (29,)), torch.randn(29), torch.randn(29)
    sizes = [min(c, 29 - lo) for c in [chunk or 29] for lo in range(0, 29, c)]  # chunk rows, first to last
    calls = _count_logits(monkeypatch)
    kept = _fwd_bwd(h, w, y, g1, g2, chunk_size=chunk, return_entropy=return_entropy)
    assert calls == sizes[::-1] + sizes[1:]  # forward last to first; the backward recomputes all but the first
    calls.clear()
    again = _fwd_bwd(h, w, y, g1, g2, chunk_size=chunk, return_entropy=return_entropy, recompute=True)
    assert calls == sizes[::-1] + sizes
    for a, b in zip(kept[0] + kept[1], again[0] + again[1], strict=True):
        assert torch.equal(a, b)
    ref_lp, ref_ent = _naive(h.double(), w.double(), y)  # and they are right
    tol = dict(rtol=1e-4, atol=1e-4) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kept[0][0].double(), ref_lp, **tol)
    if return_entropy:
        torch.testing.assert_close(kept[0][1].double(), ref_ent, **tol)


def test_a_second_backward_through_the_graph_recomputes_to_the_same_gradients(monkeypatch):
    torch.manual_seed(3)
    h = torch.randn(7, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    lp, ent = fused_logprobs(h, w, torch.randint(0, 20, (7,)), return_entropy=True)
    loss = lp.sum() + 0.5 * ent.sum()
    calls = _count_logits(monkeypatch)
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    assert calls == []  # the kept logits, used up in place
    second = torch.autograd.grad(loss, (h, w))
    assert calls == [7]  # recomputed
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_kept_logits_live_from_forward_to_backward_only(monkeypatch):
    """Held while the graph waits for its backward, freed by it; never held without a graph."""
    import gc
    import weakref

    made: list = []
    original = lp_module.shard_logits
    monkeypatch.setattr(lp_module, "shard_logits", lambda h, w, d: made.append(weakref.ref(r := original(h, w, d))) or r)
    h, w, y = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True), torch.randint(0, 20, (6,))
    with torch.no_grad():
        fused_logprobs(h, w, y)
    gc.collect()
    assert made[-1]() is None
    lp = fused_logprobs(h, w, y)
    gc.collect()
    assert made[-1]() is not None  # kept for the backward
    lp.sum().backward()
    gc.collect()
    assert made[-1]() is None and len(made) == 2  # used up, not recomputed


def test_row_blocks_round_like_the_whole_chunk(monkeypatch):
    """The forward's statistics and the backward's gradient, computed over row blocks, equal the
    same arithmetic on the whole ``[C, V]`` chunk at once bit for bit, at 1 and 2 threads: the
    blocks change no training result. (The sums are why a one-row remainder joins its neighbour:
    torch splits a single row's sum over threads and rounds it differently.)"""
    monkeypatch.setattr(chunking, "BLOCK_BYTES", 3 * 5003 * 4)  # 3 rows a block; 37 = 11*3 + 4
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(n)
            z = torch.randn(37, 5003) * 4  # 185,111 elements: past torch's 32,768-element grain
            y, lse, ent = torch.randint(0, 5003, (37,)), torch.logsumexp(z, -1), torch.rand(37) * 3
            g1, g2 = torch.randn(37), torch.randn(37)
            m, s, a, t = shard_stats(z, y, 0, True)
            whole = z - z.max(-1).values.unsqueeze(-1)  # the whole-chunk arithmetic
            assert torch.equal(a, whole.exp().mul_(whole).sum(-1))
            assert torch.equal(s, whole.exp_().sum(-1))
            logp = z - lse.unsqueeze(-1)
            want = (logp + ent.unsqueeze(-1)).mul_(-g2.unsqueeze(-1)).mul_(logp.exp()).add_(logp.exp().mul_(-g1.unsqueeze(-1)))
            want.scatter_add_(-1, y.unsqueeze(-1), g1.unsqueeze(-1))
            assert torch.equal(grad_logits_(z.clone(), lse, ent, y, 0, g1, g2), want)
    finally:
        torch.set_num_threads(threads)


def test_row_blocks_cover_the_rows_in_order_without_a_lone_row():
    rng = random.Random(0)
    for _ in range(300):
        rows, block = rng.randint(0, 60), rng.randint(2, 9)
        got = row_blocks(rows, block)
        assert [i for lo, hi in got for i in range(lo, hi)] == list(range(rows))  # every row once, in order
        assert all(2 <= hi - lo <= block + 1 or rows == 1 for lo, hi in got)
    assert row_blocks(7, 3) == [(0, 3), (3, 7)] and row_blocks(6, 3) == [(0, 3), (3, 6)] and row_blocks(1, 3) == [(0, 1)]
    with pytest.raises(ValueError, match="block = 1: must be >= 2 rows"):
        row_blocks(5, 1)


def test_chunk_for_budget_is_the_largest_chunk_that_fits():
    # 151936 float32 logits a row = 607,744 bytes; 512 MiB / 607,744 = 883.4 rows; 32 MiB blocks
    # are 55 rows, two blocks and their merged remainders take 2 * (55 + 1) = 112 rows: 771
    assert chunking.BLOCK_BYTES == 32 * 2**20
    assert chunk_for_budget(151936, torch.float32, 512 * 2**20) == 771
    assert chunk_for_budget(151936 // 8, torch.float32, 512 * 2**20) == 6183  # 8 TP shards: 75,968 bytes a row, 7067 - 2 * (441 + 1)
    rng = random.Random(0)
    for _ in range(500):
        v, dtype = rng.randint(1, 300_000), rng.choice([torch.float32, torch.float64])
        budget = rng.choice([rng.randint(1, 2**34), rng.randint(1, 64 * v * 8)])  # large, and near a few rows
        item = 4 if dtype == torch.float32 else 8
        block = chunking.block_rows(v, item) + 1

        def need(c, v=v, item=item, block=block):  # the logits and two scratch blocks, bytes
            return (c + 2 * min(c, block)) * v * item

        c = chunk_for_budget(v, dtype, budget)
        assert c >= 1
        assert c == 1 or need(c) <= budget  # fits
        assert need(c + 1) > budget  # and one more row would not
        assert chunk_for_budget(v, dtype, budget * 2) >= c  # monotone in the budget
        assert chunk_for_budget(v * 2, dtype, budget) <= c  # and in the vocabulary
    with pytest.raises(ValueError, match=r"chunk_for_budget\(vocab_shard=0, budget=5\): both must be >= 1"):
        chunk_for_budget(0, torch.float32, 5)


def test_chunk_rows_splits_tokens_into_equal_budget_chunks_or_takes_the_given_size():
    row = 151936 * 4
    assert chunk_rows(2048, None, 151936, torch.float32, 512 * 2**20) == 683  # 3 chunks of at most 771
    assert chunk_rows(771, None, 151936, torch.float32, 512 * 2**20) == 771  # one chunk
    assert chunk_rows(772, None, 151936, torch.float32, 512 * 2**20) == 386
    assert chunk_rows(2048, 1024, 151936, torch.float32, row) == 1024  # explicit: as given, whatever the budget
    assert chunk_rows(0, None, 151936, torch.float32, 512 * 2**20) == 771


def test_budget_default_gives_one_chunk_and_an_explicit_chunk_the_same_values(monkeypatch):
    torch.manual_seed(4)
    h, w, y = torch.randn(40, 16), torch.randn(64, 16), torch.randint(0, 64, (40,))
    calls = _count_logits(monkeypatch)
    by_budget = _fwd_bwd(h, w, y, torch.ones(40), None)  # default: a 512 MiB budget, one chunk
    assert calls == [40]
    calls.clear()
    small = _fwd_bwd(h, w, y, torch.ones(40), None, memory_budget=64 * 4 * 90)  # 90 rows: 30 and 2 blocks: 2 chunks of 20
    assert calls == [20, 20, 20]  # two chunks made, the second recomputed
    torch.testing.assert_close(by_budget[0][0], small[0][0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"memory_budget must be >= 1 byte \(default 536870912\), got 0"):
        fused_logprobs(h, w, y, memory_budget=0)


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
        # one chunk (the budget default): kept logits vs the recomputing backward, bit for bit
        w_shard = w.chunk(world)[rank]
        for with_entropy in (False, True):
            kw = dict(tp_group=dist.group.WORLD, return_entropy=with_entropy, impl=impl)
            kept = _fwd_bwd(h, w_shard, y, g1, g2, **kw)
            again = _fwd_bwd(h, w_shard, y, g1, g2, recompute=True, **kw)
            assert all(torch.equal(a, b) for a, b in zip(kept[0] + kept[1], again[0] + again[1], strict=True))
            torch.testing.assert_close(kept[0][0], ref_lp, rtol=1e-5, atol=1e-5)
            if with_entropy:  # the reference's loss: its gradients too
                torch.testing.assert_close(kept[1][0], hf.grad, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(kept[1][1], wf.grad.chunk(world)[rank], rtol=1e-4, atol=1e-5)
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
