"""The embedded backend: sampling, KV cache, dual-context log-probs, micro-batching, checkpoints."""

import inspect
import math
import random

import pytest
import torch
import torch.nn.functional as F

from nemo_guide.backends.base import Generator, LogprobGenerator, Policy, PromptTokenizer, Totals
from nemo_guide.backends.torch.backend import TorchBackend
from nemo_guide.errors import RunError
from nemo_guide.backends.torch.sampling import filter_top_p, generate, left_pad, right_pad
from nemo_guide.backends.torch.tiny import CharTokenizer, TinyConfig, TinyDecoder, load_tiny, sampling_step, save_tiny, sequence_logits
from nemo_guide.checkpoint import CorruptCheckpoint, step_dir, write_checkpoint
from nemo_guide.config import BackendConfig, OptimConfig
from nemo_guide.steps import build_batch, micro_share, policy_loss_fn
from nemo_guide.config import AlgorithmConfig


@pytest.fixture
def random_tiny(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_tiny(path, TinyDecoder(TinyConfig(d_model=32, n_layer=2, n_head=2, d_ff=64, max_seq_len=96)))
    return path


def make_backend(model, **optim):
    return TorchBackend(BackendConfig(model=str(model), device="cpu", logprob_chunk_size=7), OptimConfig(lr=1e-3, **optim))


def direct_logprobs(backend, prompt, response):
    """log p(response | prompt) by one unpadded full-logits forward: the reference."""
    ids = torch.tensor([prompt + response])
    mask = torch.ones_like(ids, dtype=torch.bool)
    if hasattr(backend.model, "output_weight"):
        logits = sequence_logits(backend.model, ids, mask)[0]
    else:
        logits = backend.model(input_ids=ids).logits[0].float()
    logp = F.log_softmax(logits.float() / backend.temperature, dim=-1)
    return torch.stack([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)])


def test_padding_helpers():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]
    ids, mask = right_pad([[5], [6, 7]], pad_id=0, width=3)
    assert ids.tolist() == [[5, 0, 0], [6, 7, 0]] and mask.sum().item() == 3
    with pytest.raises(ValueError, match="width"):
        right_pad([[1, 2, 3]], 0, width=2)


def test_top_p_hand_computed():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps 0.5 and 0.3 (mass before 0.15 is 0.8 >= 0.7).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_top_p(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    # the most likely token always stays
    assert filter_top_p(logits, 0.01).isfinite().tolist() == [[True, False, False, False]]
    assert torch.equal(filter_top_p(logits, 1.0), logits)


def test_kv_cache_matches_full_forward(random_tiny):
    model, _ = load_tiny(random_tiny)
    model.eval()
    tok = CharTokenizer()
    prompts = [tok.encode("Q:12+34="), tok.encode("H:#=7a+3b;Q:47#31=")]
    # Greedy with the cache ...
    responses, finished = generate(sampling_step(model), prompts, pad_id=0, eos_ids=[2], max_new_tokens=12, temperature=0.0)
    # ... equals greedy by full recomputation of each unpadded sequence.
    for prompt, response in zip(prompts, responses, strict=True):
        seq = list(prompt)
        for _ in range(len(response)):
            ids = torch.tensor([seq])
            logits = sequence_logits(model, ids, torch.ones_like(ids, dtype=torch.bool))[0, -1]
            seq.append(int(logits.argmax()))
        assert seq[len(prompt):] == response


def test_generation_is_seeded_and_stops_at_eos(random_tiny):
    backend = make_backend(random_tiny)
    prompts = [backend.encode("Q:12+34=")] * 6
    a = backend.generate(prompts, max_new_tokens=20, temperature=1.0, seed=3)
    b = backend.generate(prompts, max_new_tokens=20, temperature=1.0, seed=3)
    c = backend.generate(prompts, max_new_tokens=20, temperature=1.0, seed=4)
    assert a == b and a != c
    for response, finished in zip(*a, strict=True):
        assert 1 <= len(response) <= 20
        assert finished == (response[-1] in backend.eos_ids)
        assert all(t not in backend.eos_ids for t in response[:-1])


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_logprobs_are_the_samplers_and_leave_the_samples_unchanged(random_tiny, top_p):
    """generate_with_logprobs draws the same tokens as generate for a seed, and reports each token's
    log-prob under the distribution it was drawn from (temperature and top-p applied)."""
    backend = make_backend(random_tiny)
    prompts = [backend.encode("Q:12+34="), backend.encode("Q:5#6=")] * 2
    plain = backend.generate(prompts, max_new_tokens=12, temperature=1.0, top_p=top_p, seed=5)
    responses, finished, logprobs = backend.generate_with_logprobs(prompts, max_new_tokens=12, temperature=1.0, top_p=top_p, seed=5)
    assert (responses, finished) == plain
    for prompt, response, lp in zip(prompts, responses, logprobs, strict=True):
        full = direct_logprobs(backend, prompt, response)  # the trainer's view: no top-p
        assert len(lp) == len(response)
        if top_p == 1.0:
            torch.testing.assert_close(torch.tensor(lp), full, rtol=1e-4, atol=1e-4)
        else:  # renormalised over the nucleus: never below the full distribution's log-prob
            assert all(a >= b - 1e-4 for a, b in zip(lp, full.tolist(), strict=True))


@pytest.mark.parametrize("protocol", [PromptTokenizer, Generator, LogprobGenerator, Policy])
def test_backend_implements_every_declared_member(random_tiny, protocol):
    """Each role's attributes exist, and each method takes every parameter the protocol declares
    (same name and kind), so a host can call the backend through the protocol alone."""
    backend = make_backend(random_tiny)
    attributes = [name for name in protocol.__annotations__ if not name.startswith("_")]
    methods = [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]
    assert attributes or methods
    for name in attributes:
        assert name in vars(backend), f"TorchBackend lacks attribute {name}"
    for name in methods:
        declared = inspect.signature(vars(protocol)[name]).parameters
        actual = inspect.signature(getattr(type(backend), name)).parameters
        for param in declared.values():
            assert param.name in actual and actual[param.name].kind == param.kind, f"{name}({param.name})"


def _dual_batch(backend):
    plain = [backend.encode("Q:47#31="), backend.encode("Q:05+7=")]
    hinted = [backend.encode("H:#=7a+3b;Q:47#31="), plain[1]]
    responses = [backend.encode("#=7a+3b;7*4=8") + [2], backend.encode("+=1a+1b;A:")]
    n = len(responses)
    return build_batch(plain, hinted, responses, torch.zeros(n), torch.arange(n), torch.tensor([True, False]), torch.ones(n, dtype=torch.bool))


@pytest.mark.parametrize("context", ["plain", "sample"])
def test_logprobs_match_unpadded_forward(random_tiny, context):
    backend = make_backend(random_tiny)
    batch = _dual_batch(backend)
    logprobs, entropy = backend.logprobs(batch, context, with_entropy=True)
    assert logprobs.shape == entropy.shape == batch.loss_mask.shape
    for i, response in enumerate(batch.response_ids):
        ref = direct_logprobs(backend, batch.prompts(context)[i], response)
        torch.testing.assert_close(logprobs[i, : len(response)], ref, atol=1e-5, rtol=1e-5)
        assert (logprobs[i, len(response):] == 0).all()
    # The guided row differs between contexts, the plain row does not.
    other, _ = backend.logprobs(batch, "plain" if context == "sample" else "sample")
    assert not torch.allclose(logprobs[0], other[0])
    torch.testing.assert_close(logprobs[1], other[1])


def test_logprobs_do_not_depend_on_batch_mates(random_tiny):
    backend = make_backend(random_tiny)
    batch = _dual_batch(backend)
    together, _ = backend.logprobs(batch, "sample")
    alone, _ = backend.logprobs(batch.select([0]), "sample")
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


def test_temperature_scales_logits(random_tiny):
    backend = make_backend(random_tiny)
    backend.temperature = 0.5
    batch = _dual_batch(backend)
    logprobs, _ = backend.logprobs(batch, "plain")
    ref = direct_logprobs(backend, batch.plain_prompt_ids[0], batch.response_ids[0])
    torch.testing.assert_close(logprobs[0, : len(ref)], ref, atol=1e-5, rtol=1e-5)


def _guide_batch(backend, n=6):
    torch.manual_seed(1)
    prompts = [backend.encode(f"Q:{i}{i}#3{i}=") for i in range(n)]
    hinted = [backend.encode(f"H:#=7a+3b;Q:{i}{i}#3{i}=") for i in range(n)]
    responses = [backend.encode("#=7a+3b;" + "7*4=8,"[: i + 1]) for i in range(n)]
    guided = torch.tensor([i % 2 == 0 for i in range(n)])
    batch = build_batch(prompts, hinted, responses, torch.rand(n), torch.arange(n) // 2, guided, torch.ones(n, dtype=torch.bool))
    old, _ = backend.logprobs(batch, "sample")
    return batch.with_(old_logprobs=old - 0.1 * torch.rand_like(old) * batch.loss_mask, advantages=torch.randn(n))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(random_tiny, aggregation):
    algo = AlgorithmConfig(aggregation=aggregation)
    results = []
    for micro in (6, 4, 1):
        backend = make_backend(random_tiny, grad_clip=0.0)
        batch = _guide_batch(backend)
        backend.train_step(batch, policy_loss_fn(algo, num_prompts=3), micro_batch_size=micro)
        # The accumulated gradient (still in .grad after the step; grad_clip=0 leaves it unscaled).
        results.append(torch.cat([p.grad.flatten() for p in backend.model.parameters()]))
    assert results[0].abs().max() > 0
    torch.testing.assert_close(results[0], results[1], atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(results[0], results[2], atol=1e-7, rtol=1e-4)


def test_micro_share_hand_computed():
    # mini: rows with 3, 1, 0 (not trained), 2 tokens = 6 tokens, 3 counted rows.
    lengths = [[1, 1, 1], [1], [1], [1, 1]]
    batch = build_batch([[1]] * 4, [[1]] * 4, lengths, torch.zeros(4), torch.arange(4), torch.zeros(4, dtype=torch.bool), torch.tensor([True, True, False, True]))
    micro = batch.select([0, 1])
    assert micro_share(micro, Totals.of(batch), "token-mean") == pytest.approx(4 / 6)
    assert micro_share(micro, Totals.of(batch), "seq-mean-token-mean") == pytest.approx(2 / 3)
    assert micro_share(micro, Totals.of(batch), "paper") == 1.0
    # a data-parallel host passes the totals of every rank's share: the same micro-batch then carries less
    assert micro_share(micro, Totals(tokens=12.0, rows=6.0), "token-mean") == pytest.approx(4 / 12)
    assert micro_share(micro, Totals(tokens=12.0, rows=6.0), "seq-mean-token-sum") == pytest.approx(2 / 6)


def test_train_step_changes_every_parameter_and_skips_non_finite(random_tiny):
    backend = make_backend(random_tiny)
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    metrics = backend.train_step(_guide_batch(backend), policy_loss_fn(AlgorithmConfig(), num_prompts=3), micro_batch_size=4)
    assert metrics["optim/skipped"] == 0 and math.isfinite(metrics["optim/grad_norm"])
    assert math.isfinite(metrics["loss/total"])
    after = backend.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    # A NaN loss: the step is skipped and nothing changes.
    snapshot = {k: v.clone() for k, v in after.items()}

    def nan_loss(micro, logprobs, entropy, mini):
        return logprobs.sum() * float("nan"), {}

    metrics = backend.train_step(_guide_batch(backend), nan_loss, micro_batch_size=4)
    assert metrics["optim/skipped"] == 1
    assert all(torch.equal(snapshot[k], v) for k, v in backend.model.state_dict().items())


def test_save_load_roundtrip(random_tiny, tmp_path):
    backend = make_backend(random_tiny)
    backend.train_step(_guide_batch(backend), policy_loss_fn(AlgorithmConfig(), num_prompts=3), micro_batch_size=8)
    (tmp_path / "ckpt").mkdir()
    backend.save(tmp_path / "ckpt")
    other = make_backend(random_tiny)
    other.load(tmp_path / "ckpt")
    for (k, v), (_, w) in zip(backend.model.state_dict().items(), other.model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert other.optimizer.state_dict()["state"][0]["step"] == backend.optimizer.state_dict()["state"][0]["step"]
    # Weights from another model are refused with a clear message.
    wrong = tmp_path / "wrong.safetensors"
    save_tiny(wrong, TinyDecoder(TinyConfig(d_model=16, n_layer=1, n_head=2, d_ff=32)))
    with pytest.raises(RunError, match=r"ckpt/model.safetensors does not fit backend.model = .*wrong.safetensors.*size mismatch.*another model"):
        make_backend(wrong).load(tmp_path / "ckpt")


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_checkpoint_files_are_named_with_the_checkpoint_to_use(random_tiny, tmp_path, damage):
    backend = make_backend(random_tiny)
    run_dir = tmp_path / "run"
    for step in (1, 2):
        write_checkpoint(run_dir, step, save_backend=backend.save, state={"step": step}, config={}, keep=2)
    ckpt, previous = step_dir(run_dir, 2), step_dir(run_dir, 1)
    # model.safetensors through load_weights (nemo-guide eval) and load (resume); optimizer.pt through load.
    for name, kind, loaders in [("model.safetensors", "not a complete safetensors file", (backend.load_weights, backend.load)), ("optimizer.pt", "", (backend.load,))]:
        path = ckpt / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else random.Random(0).randbytes(len(data)))
        for load in loaders:
            with pytest.raises(CorruptCheckpoint, match=rf"{path} is corrupt \({kind}.*previous complete checkpoint instead, {previous}: pass checkpoint={previous}"):
                load(ckpt)
        path.write_bytes(data)
    # A file outside any run directory: nothing to suggest.
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{not json")
    with pytest.raises(CorruptCheckpoint, match=rf"{loose / 'model.safetensors'} is corrupt .*no other checkpoint to suggest"):
        backend.load_weights(loose)
    backend.load(ckpt)  # repaired: loads


def test_reference_snapshot_is_frozen(random_tiny):
    backend = make_backend(random_tiny)
    batch = _guide_batch(backend)
    with pytest.raises(RuntimeError, match="reference"):
        backend.logprobs(batch, "plain", reference=True)
    backend.snapshot_reference()
    ref_before, _ = backend.logprobs(batch, "plain", reference=True)
    backend.train_step(batch, policy_loss_fn(AlgorithmConfig(), num_prompts=3), micro_batch_size=8)
    ref_after, _ = backend.logprobs(batch, "plain", reference=True)
    current, _ = backend.logprobs(batch, "plain")
    torch.testing.assert_close(ref_before, ref_after)
    assert not torch.allclose(current, ref_after)


def test_tokenizer_rejects_unknown_characters():
    with pytest.raises(ValueError, match="cannot encode"):
        CharTokenizer().encode("Q: 1 + é")


def test_hf_qwen2_logprobs_match_direct_forward(tiny_qwen2_dir):
    backend = make_backend(tiny_qwen2_dir)
    assert backend.adapter.kind == "hf"
    batch = _dual_batch(backend)
    for context in ("plain", "sample"):
        logprobs, _ = backend.logprobs(batch, context)
        for i, response in enumerate(batch.response_ids):
            ref = direct_logprobs(backend, batch.prompts(context)[i], response)
            torch.testing.assert_close(logprobs[i, : len(response)], ref, atol=1e-4, rtol=1e-4)


def test_hf_generation_matches_full_forward(tiny_qwen2_dir):
    backend = make_backend(tiny_qwen2_dir)
    prompts = [backend.encode("Q:12+34="), backend.encode("H:#=7a+3b;Q:47#31=")]
    responses, _ = backend.generate(prompts, max_new_tokens=6, temperature=0.0)
    for prompt, response in zip(prompts, responses, strict=True):
        seq = list(prompt)
        for _ in range(len(response)):
            seq.append(int(backend.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(prompt):] == response
