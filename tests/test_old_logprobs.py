"""algorithm.old_logprobs: on-policy updates take plain-prompt pi_old from the training forward.

The reuse path must equal the recompute path bit for bit (loss, metrics, gradients, weights,
pi_old's entropy) on the embedded CPU backend, whose forward does not depend on how rows are
batched; and it must leave a forward of their own to the rows that need one (guided rows behind
their hint, rows not trained, every row of an off-policy update or of TIS on the sampling prompt).
"""

import math

import pytest
import torch

from nemo_guide.backends.base import TRAIN_ENTROPY
from nemo_guide.cli import make_backend
from nemo_guide.config import AlgorithmConfig
from nemo_guide.loop import load_prompts, reward_name, train
from nemo_guide.on_policy import old_from_current_rows, update_on_policy, with_current_entropy
from nemo_guide.rewards import make_reward
from nemo_guide.steps import (
    build_batch,
    choose_guidance,
    dual_context_batch,
    groups_and_advantages,
    policy_loss_fn,
    sample_and_score,
    step_seed,
    trained_rows,
    update,
    with_old_logprobs,
)
from nemo_guide.tracking import read_metrics

NAN = float("nan")


# -- the rows that reuse ---------------------------------------------------------------------


def _batch(guided, trained, hinted=None):
    """Rows with one response token each; ``hinted`` rows have a sampling prompt other than the plain one."""
    n = len(guided)
    hinted = guided if hinted is None else hinted
    return build_batch(
        [[1]] * n, [[2] if h else [1] for h in hinted], [[3]] * n, torch.zeros(n), torch.arange(n),
        torch.tensor(guided), torch.tensor(trained),
    )


@pytest.mark.parametrize(
    ("settings", "mini_batch_size", "expected"),
    [
        ({}, None, [True, True, False, False]),  # plain rows; guided rows keep their hinted forward; untrained row 3
        ({"old_logprob_context": "plain"}, None, [True, True, True, False]),  # pi_old on the plain prompt for every row
        ({}, 3, [True, True, False, False]),  # one mini-batch holds the 3 trained rows
        ({}, 2, [False] * 4),  # two mini-batches: the second sees updated weights
        ({"ppo_epochs": 2}, None, [False] * 4),  # the second epoch sees updated weights
        ({"old_logprobs": "recompute"}, None, [False] * 4),
        ({"mode": "sft"}, None, [False] * 4),  # SFT trains on reference solutions, not on these rows
        ({"rollout_correction": "tis"}, None, [False] * 4),  # its weights need pi_old of every row first
        ({"rollout_correction": "tis", "old_logprob_context": "plain"}, None, [True, True, True, False]),  # TIS scores the hint itself
    ],
)
def test_old_from_current_rows(settings, mini_batch_size, expected):
    batch = _batch(guided=[False, False, True, False], trained=[True, True, True, False])
    assert old_from_current_rows(batch, AlgorithmConfig(**settings), mini_batch_size).tolist() == expected


def test_reuse_follows_the_prompt_not_the_flag():
    """A row sampled behind a prompt other than its plain one keeps its own forward, whatever its flag says."""
    batch = _batch(guided=[False, False], trained=[True, True], hinted=[False, True])
    assert old_from_current_rows(batch, AlgorithmConfig(), None).tolist() == [True, False]


def test_with_current_as_old_hand_computed():
    batch = _batch(guided=[False, True], trained=[True, True]).with_(
        old_logprobs=torch.tensor([[NAN], [-2.0]]), old_from_current=torch.tensor([True, False])
    )
    logprobs = torch.tensor([[-0.5], [-0.7]], requires_grad=True)
    old = batch.with_current_as_old(logprobs).old_logprobs
    assert torch.equal(old, torch.tensor([[-0.5], [-2.0]]))  # row 0: the current value; row 1: its own
    assert not old.requires_grad  # pi_old is a constant of the loss
    plain = batch.with_(old_from_current=None)
    assert plain.with_current_as_old(logprobs) is plain


class CountingPolicy:
    """Log-probs -1 - row index behind either prompt; records the rows of every call."""

    def __init__(self):
        self.rows = []

    def logprobs(self, batch, context, *, reference=False, with_entropy=False):
        self.rows.append((context, reference, batch.group.tolist()))
        lp = -1.0 - batch.group.float()[:, None].expand(batch.loss_mask.shape).clone()
        return lp, (lp.neg() if with_entropy else None)

    def train_step(self, batch, loss_fn, *, micro_batch_size, with_entropy=False):
        self.rows.append(("train", with_entropy, batch.group.tolist()))
        out = {"optim/skipped": 0.0}
        if with_entropy:
            out[TRAIN_ENTROPY] = 10.0 + batch.group.float()[:, None].expand(batch.loss_mask.shape)
        return out


def test_with_old_logprobs_scores_only_the_other_rows():
    batch = _batch(guided=[False, False, True, False], trained=[True, True, True, False])
    policy = CountingPolicy()
    current = torch.tensor([True, True, False, False])
    out, entropy = with_old_logprobs(policy, batch, AlgorithmConfig(kl_coef=0.1), current=current)
    assert policy.rows == [("sample", False, [2, 3]), ("plain", True, [0, 1, 2, 3])]  # pi_ref still scores every row
    assert torch.equal(out.old_from_current, current)
    assert out.old_logprobs[2:].flatten().tolist() == [-3.0, -4.0] and out.old_logprobs[:2].isnan().all()
    assert entropy[2:].flatten().tolist() == [3.0, 4.0] and entropy[:2].isnan().all()
    # nothing to reuse: the one forward over every row, as with recompute
    policy = CountingPolicy()
    out, _ = with_old_logprobs(policy, batch, AlgorithmConfig(), current=torch.zeros(4, dtype=torch.bool))
    assert policy.rows == [("sample", False, [0, 1, 2, 3])] and out.old_from_current is None


def test_update_on_policy_is_update_with_pi_olds_entropy_in_row_order():
    batch = _batch(guided=[False] * 6, trained=[True] * 6)
    policy = CountingPolicy()
    updates, entropy = update_on_policy(policy, batch, lambda *a: None, micro_batch_size=4, seed=7)
    reference = CountingPolicy()
    assert update(reference, batch, lambda *a: None, epochs=1, mini_batch_size=None, micro_batch_size=4, with_entropy=False, seed=7) == updates
    (_, with_entropy, order), = policy.rows
    assert with_entropy and order == reference.rows[0][2] and order != sorted(order)  # the same shuffle
    assert updates == [{"optim/skipped": 0.0}]  # the tensor is taken out of the metrics
    assert entropy.flatten().tolist() == [10.0 + i for i in range(6)]  # back in the batch's row order
    assert update_on_policy(policy, batch.select([]), lambda *a: None, micro_batch_size=4, seed=7)[0] == []


def test_with_current_entropy_fills_the_reused_trained_rows():
    # rows 0 and 2 reuse; row 1 (guided) has its own entropy; row 3 is not trained
    batch = _batch(guided=[False, True, False, False], trained=[True, True, True, False]).with_(old_from_current=torch.tensor([True, False, True, False]))
    step9 = torch.tensor([[NAN], [5.0], [NAN], [6.0]])
    trained = torch.tensor([[1.0], [99.0], [3.0]])  # the trained rows 0, 1, 2 in order; row 1's is not pi_old's
    assert with_current_entropy(step9, batch, trained).flatten().tolist() == [1.0, 5.0, 3.0, 6.0]


# -- bit for bit on the built-in tiny policy -------------------------------------------------


def _real_batch(cfg, backend):
    """Steps 2-8 of one training step of ``cfg`` (the first prompt batch) on ``backend``."""
    algo, k = cfg.algorithm, cfg.algorithm.group_size
    prompts, _ = load_prompts(cfg, backend)
    idx = list(range(cfg.data.prompt_batch_size))
    reward = make_reward(reward_name(cfg), num_workers=1)
    try:
        answers = [prompts.records[i].answer for i in idx]
        plain = sample_and_score(backend, backend, reward, [prompts.plain[i] for i in idx], answers, group_size=k, generation=cfg.generation, seed=step_seed(0, 1, 0))
        guide = choose_guidance(plain, k, algo)
        chosen = [i for i, g in zip(idx, guide.tolist(), strict=True) if g]
        guided = sample_and_score(
            backend, backend, reward, [prompts.hinted[i] for i in chosen], [prompts.records[i].answer for i in chosen],
            plain=[prompts.plain[i] for i in chosen], group_size=k, generation=cfg.generation, seed=step_seed(0, 1, 1),
        )
    finally:
        reward.close()
    return dual_context_batch(plain, guided, groups_and_advantages(plain.rewards, guided.rewards, guide, algo))


def _recording(loss_fn, seen):
    def recorded(micro, logprobs, entropy, totals):
        loss, metrics = loss_fn(micro, logprobs, entropy, totals)
        seen.append((loss.detach().clone(), {k: v.clone() for k, v in metrics.items()}, micro.old_logprobs.clone()))
        return loss, metrics

    return recorded


def _step_9_and_10(cfg, batch, *, reuse):
    """Steps 9-10 as the loop runs them; returns what the loss saw, the gradients, weights and pi_old's entropy."""
    algo = cfg.algorithm
    backend = make_backend(cfg)
    if algo.kl_coef > 0:
        backend.snapshot_reference()
    scored = []
    inner = backend.logprobs
    backend.logprobs = lambda b, context, **kw: (scored.append(len(b)) or inner(b, context, **kw))
    current = old_from_current_rows(batch, algo, cfg.optim.mini_batch_size) if reuse else None
    batch, entropy = with_old_logprobs(backend, batch, algo, current=current)
    seen = []
    loss_fn = _recording(policy_loss_fn(algo, cfg.data.prompt_batch_size), seen)
    settings = dict(micro_batch_size=cfg.optim.micro_batch_size, seed=step_seed(0, 1, 2))
    if reuse:
        updates, trained_entropy = update_on_policy(backend, trained_rows(batch), loss_fn, **settings)
        entropy = with_current_entropy(entropy, batch, trained_entropy)
    else:
        updates = update(backend, trained_rows(batch), loss_fn, epochs=1, mini_batch_size=None, with_entropy=algo.entropy_coef > 0, **settings)
    grads = [p.grad.clone() for p in backend.model.parameters()]
    weights = [p.detach().clone() for p in backend.model.parameters()]
    return dict(seen=seen, updates=updates, grads=grads, weights=weights, entropy=entropy, scored=scored, current=current)


@pytest.mark.parametrize(
    "overrides",
    [
        ("algorithm.mode=guide_grpo",),  # the main job's algorithm: guided rows keep their hinted forward
        ("algorithm.mode=grpo", "generation.temperature=1.5"),  # no old-log-prob forward at all (hotter: mixed groups)
        ("algorithm.old_logprob_context=plain",),  # Appendix D's variant: guided rows reuse too
        ("algorithm.kl_coef=0.05", "algorithm.entropy_coef=0.01", "optim.micro_batch_size=5"),  # pi_ref and the entropy term
    ],
    ids=["guide_grpo", "grpo", "plain_context", "kl_entropy"],
)
def test_reuse_equals_recompute_bit_for_bit(tiny_cfg, overrides):
    cfg = tiny_cfg("data.prompt_batch_size=8", "algorithm.guidance_threshold=mostly_incorrect", "optim.micro_batch_size=16", *overrides)
    batch = _real_batch(cfg, make_backend(cfg))
    n_guided = int(batch.guided.sum())
    assert (n_guided > 0) == (cfg.algorithm.mode == "guide_grpo")
    reuse, recompute = _step_9_and_10(cfg, batch, reuse=True), _step_9_and_10(cfg, batch, reuse=False)

    # the forward of step 9 scores only the rows that need one (pi_ref: every row)
    own = 0 if cfg.algorithm.old_logprob_context == "plain" else n_guided
    kl = [len(batch)] if cfg.algorithm.kl_coef > 0 else []
    assert reuse["current"].sum() == len(batch) - own
    assert reuse["scored"] == ([own] if own else []) + kl and recompute["scored"] == [len(batch)] + kl
    # the loss, its metrics and the pi_old it saw; the gradients; the updated weights; pi_old's entropy
    assert len(reuse["seen"]) == len(recompute["seen"]) > 1
    for (loss_a, metrics_a, old_a), (loss_b, metrics_b, old_b) in zip(reuse["seen"], recompute["seen"], strict=True):
        assert torch.equal(loss_a, loss_b) and torch.equal(old_a, old_b)
        assert metrics_a.keys() == metrics_b.keys()
        assert all(torch.equal(metrics_a[k], metrics_b[k]) or (metrics_a[k].isnan() and metrics_b[k].isnan()) for k in metrics_a)
    assert repr(reuse["updates"]) == repr(recompute["updates"])  # repr: NaN equals NaN
    assert reuse["updates"][0]["optim/grad_norm"] > 0
    assert all(torch.equal(a, b) for a, b in zip(reuse["grads"], recompute["grads"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(reuse["weights"], recompute["weights"], strict=True))
    # pi_old's entropy. With old_logprob_context=sampling, recompute scores plain rows in one forward
    # with hinted prompts, so with more left padding than the training forward gives them (here 10
    # columns: every plain prompt has 8 tokens, every hinted one 18). torch's CPU
    # scaled_dot_product_attention reduces over keys in blocks counted from column 0, so a row's
    # outputs move in the last bits when its keys start elsewhere (a shift that is not a multiple
    # of 16 columns, on this AVX-512 machine): hidden states move by ~1e-6, the entropies of the tiny policy's near-certain tokens by
    # ~1e-10, and their log-probs (z - logsumexp, at float32 resolution) not at all.
    if n_guided and cfg.algorithm.old_logprob_context == "sampling":
        torch.testing.assert_close(reuse["entropy"], recompute["entropy"], rtol=0, atol=1e-8)
    else:
        assert torch.equal(reuse["entropy"], recompute["entropy"])


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("algorithm.mode=filter_grpo",),  # filtered plain rows are not trained: their entropy needs step 9's forward
        ("algorithm.guided_group=replace", "algorithm.guidance_threshold=mostly_incorrect"),
        ("algorithm.rollout_correction=tis",),  # recomputes every row
    ],
    ids=["main_job", "filter_grpo", "replace", "tis"],
)
def test_training_runs_log_the_same_metrics_with_reuse_and_recompute(tiny_cfg, overrides):
    logged = {}
    for mode in ("reuse", "recompute"):
        cfg = tiny_cfg("run.steps=2", "data.eval_limit=2", f"algorithm.old_logprobs={mode}", f"run.name={mode}", *overrides)
        train(cfg, make_backend(cfg), progress=False, log=lambda s: None)
        logged[mode] = _comparable(read_metrics(cfg.run.run_dir))
    assert all(math.isfinite(r["train/entropy"]) for r in logged["reuse"][1:])
    assert repr(logged["reuse"]) == repr(logged["recompute"])  # repr: NaN equals NaN


def test_torch_train_step_reports_the_entropy_of_the_rows_it_scored(tiny_cfg):
    """TRAIN_ENTROPY: the training forward's entropy in the mini-batch's row order, zero on padding;
    an update stopped by a non-finite loss leaves the rows it never scored NaN."""
    cfg = tiny_cfg()
    backend = make_backend(cfg)
    prompt, responses = backend.encode("Q:12+3="), [backend.encode(s, add_special_tokens=False) for s in ("A:15", "A:1", "A:155", "A:9", "A:42")]
    batch = build_batch([prompt] * 5, [prompt] * 5, responses, torch.zeros(5), torch.arange(5), torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool))
    batch = batch.with_(advantages=torch.ones(5), old_logprobs=torch.zeros(batch.loss_mask.shape))
    with torch.no_grad():
        _, expected = backend.logprobs(batch, "plain", with_entropy=True, micro_batch_size=2)  # the same layout
    calls = []

    def loss_fn(micro, logprobs, entropy, totals):
        calls.append(len(micro))
        return logprobs.sum() * (float("nan") if len(calls) == 2 else 1.0), {}

    out = backend.train_step(batch, loss_fn, micro_batch_size=2, with_entropy=True)
    assert calls == [2, 2] and out["optim/skipped"] == 1.0  # the second micro-batch stopped the update
    entropy = out[TRAIN_ENTROPY]
    assert torch.equal(entropy[:4], expected[:4]) and entropy[4].isnan().all()
    assert (entropy[1, 3:] == 0).all() and (entropy[1, :3] > 0).all()  # "A:1" has 3 tokens
    assert TRAIN_ENTROPY not in backend.train_step(batch, loss_fn, micro_batch_size=5)
