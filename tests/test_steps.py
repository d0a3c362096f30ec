"""Algorithm 1's named steps (nemo_guide.steps), each on its own with fakes and hand-computed values."""

import math

import pytest
import torch

from nemo_guide.config import AlgorithmConfig, GenerationConfig
from nemo_guide.prompts import Prompt
from nemo_guide.steps import (
    Rollouts,
    StepTimer,
    build_batch,
    choose_guidance,
    dual_context_batch,
    groups_and_advantages,
    sample_and_score,
    sft_batch,
    step_metrics,
    trained_rows,
    update,
    with_old_logprobs,
)


class Chars:
    """A PromptTokenizer over characters (id = code point), EOS 1, pad 0."""

    pad_id = 0
    eos_ids = (1,)
    max_length = None
    chat_tokenizer = None

    def encode(self, text, *, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 1)


class Scripted:
    """A Generator answering each prompt with scripted texts in turn; records its calls."""

    def __init__(self, answers):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed):
        self.calls.append({"prompts": [list(p) for p in prompts], "seed": seed, "temperature": temperature})
        out = [[ord(c) for c in self.answers["".join(map(chr, p))].pop(0)] + [1] for p in prompts]
        return out, [True] * len(out)


class Exact:
    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, *, answers):
        self.calls.append((list(prompts), list(completions), list(answers)))
        return [float(c.endswith(a)) for c, a in zip(completions, answers, strict=True)]

    def close(self):
        """Nothing to release."""


def prompt(text):
    return Prompt(text, [ord(c) for c in text], None)


GEN = GenerationConfig(max_new_tokens=8)


def test_sample_and_score_is_prompt_major_and_keeps_both_contexts():
    gen = Scripted({"H:q1": ["x=3", "x=4"], "H:q2": ["x=5", "x=9"]})
    reward = Exact()
    timer = StepTimer()
    out = sample_and_score(
        gen, Chars(), reward, [prompt("H:q1"), prompt("H:q2")], ["3", "9"],
        group_size=2, generation=GEN, seed=11, plain=[prompt("q1"), prompt("q2")], timer=timer,
    )
    # rollout j of prompt b at row b*G + j
    assert gen.calls[0]["prompts"] == [[ord(c) for c in t] for t in ("H:q1", "H:q1", "H:q2", "H:q2")]
    assert gen.calls[0]["seed"] == 11 and gen.calls[0]["temperature"] == GEN.temperature
    assert out.texts == ["x=3", "x=4", "x=5", "x=9"]
    assert out.sample_prompt_ids[0] == [ord(c) for c in "H:q1"] and out.plain_prompt_ids[3] == [ord(c) for c in "q2"]
    assert reward.calls == [(["H:q1", "H:q1", "H:q2", "H:q2"], out.texts, ["3", "3", "9", "9"])]
    assert out.rewards.tolist() == [1.0, 0.0, 0.0, 1.0] and out.rewards.dtype == torch.float32
    assert out.correct.tolist() == [True, False, False, True]
    assert set(timer.seconds) == {"generation", "scoring"}


def test_sample_and_score_without_prompts_does_not_generate():
    gen = Scripted({})
    out = sample_and_score(gen, Chars(), Exact(), [], [], group_size=4, generation=GEN, seed=0)
    assert len(out) == 0 and gen.calls == [] and out.rewards.shape == (0,)


def _rollouts(rewards, lengths=None):
    n = len(rewards)
    lengths = lengths or [2] * n
    responses = [[5] * n_tok for n_tok in lengths]
    return Rollouts([[7]] * n, [[7]] * n, responses, [True] * n, [""] * n, torch.tensor(rewards, dtype=torch.float32))


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [("all_incorrect", [True, False, False]), ("mostly_incorrect", [True, True, False]), ("always", [True, True, True]), ("never", [False, False, False])],
)
def test_choose_guidance_thresholds(threshold, expected):
    # k = 5: prompt 0 has 0 correct, prompt 1 has 1 (20% < 25%), prompt 2 has 2 (40%)
    plain = _rollouts([0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0])
    assert choose_guidance(plain, 5, AlgorithmConfig(group_size=5, guidance_threshold=threshold)).tolist() == expected


def test_choose_guidance_never_guides_outside_guide_grpo():
    plain = _rollouts([0, 0, 0, 0])
    assert choose_guidance(plain, 2, AlgorithmConfig(group_size=2, mode="grpo")).tolist() == [False, False]


def test_groups_and_advantages_union_hand_computed():
    # B = 2, k = 2: prompt 0 fails both plain rollouts and is guided (guided rewards 1, 0).
    algo = AlgorithmConfig(group_size=2)
    g = groups_and_advantages(torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([True, False]), algo)
    assert g.group.tolist() == [0, 0, 1, 1, 0, 0] and g.guided.tolist() == [False] * 4 + [True] * 2
    assert g.train_mask.all() and not g.filtered.any()
    # group 0 = {0, 0, 1, 0}: mean 0.25, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    # group 1 = {1, 0}: mean 0.5, std sqrt(0.5) = 0.7071
    s = math.sqrt(0.5)
    expected = [-0.5, -0.5, 0.5 / s, -0.5 / s, 1.5, -0.5]
    torch.testing.assert_close(g.advantages, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_groups_and_advantages_replace_takes_the_failed_rollouts_out():
    algo = AlgorithmConfig(group_size=2, guided_group="replace")
    g = groups_and_advantages(torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([True, False]), algo)
    assert g.group.tolist() == [-1, -1, 1, 1, 0, 0]
    assert g.train_mask.tolist() == [False, False, True, True, True, True]
    s = math.sqrt(0.5)
    torch.testing.assert_close(g.advantages[2:], torch.tensor([0.5 / s, -0.5 / s, 0.5 / s, -0.5 / s]), atol=1e-5, rtol=1e-5)
    assert g.advantages[:2].tolist() == [0.0, 0.0]


def test_filter_grpo_drops_exactly_the_equal_reward_groups():
    algo = AlgorithmConfig(group_size=3, mode="filter_grpo")
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # groups: all 0 / mixed / all 1
    g = groups_and_advantages(rewards, torch.zeros(0), torch.zeros(3, dtype=torch.bool), algo)
    assert g.filtered.tolist() == [True] * 3 + [False] * 3 + [True] * 3
    assert g.train_mask.tolist() == [False] * 3 + [True] * 3 + [False] * 3


def test_dual_context_batch_lays_out_plain_then_guided():
    plain = Rollouts([[10], [10]], [[10], [10]], [[3, 1], [4]], [True, False], ["", ""], torch.tensor([0.0, 0.0]))
    guided = Rollouts([[10], [10]], [[20, 21], [20, 21]], [[5, 6, 1], [7, 1]], [True, True], ["", ""], torch.tensor([1.0, 0.0]))
    g = groups_and_advantages(plain.rewards, guided.rewards, torch.tensor([True]), AlgorithmConfig(group_size=2))
    batch = dual_context_batch(plain, guided, g)
    assert batch.plain_prompt_ids == [[10]] * 4
    assert batch.sample_prompt_ids == [[10], [10], [20, 21], [20, 21]]
    assert batch.loss_mask.tolist() == [[True, True, False], [True, False, False], [True, True, True], [True, True, False]]
    assert batch.guided.tolist() == [False, False, True, True]
    assert torch.equal(batch.advantages, g.advantages)
    # replace: the failed plain rows stay in the batch (for metrics) but carry no loss
    r = groups_and_advantages(plain.rewards, guided.rewards, torch.tensor([True]), AlgorithmConfig(group_size=2, guided_group="replace"))
    trained = trained_rows(dual_context_batch(plain, guided, r))
    assert trained.guided.tolist() == [True, True]


def test_sft_batch_appends_eos_and_trains_every_token():
    batch = sft_batch(Chars(), [prompt("Q:1"), prompt("Q:22")], ["A:1", "A:22"])
    assert batch.response_ids == [[65, 58, 49, 1], [65, 58, 50, 50, 1]]
    assert batch.plain_prompt_ids == batch.sample_prompt_ids
    assert batch.loss_mask.sum(-1).tolist() == [4, 5]


class RecordingPolicy:
    """A Policy that records what it is asked; log-probs are a function of the context."""

    def __init__(self):
        self.calls, self.steps = [], []

    def logprobs(self, batch, context, *, reference=False, with_entropy=False):
        self.calls.append((context, reference))
        value = {"plain": -1.0, "sample": -2.0}[context] - (10.0 if reference else 0.0)
        lp = torch.full(batch.loss_mask.shape, value)
        return lp, (torch.ones_like(lp) if with_entropy else None)

    def train_step(self, batch, loss_fn, *, micro_batch_size, with_entropy=False):
        self.steps.append((batch.group.tolist(), micro_batch_size, with_entropy))
        return {"optim/skipped": 0.0, "optim/grad_norm": 1.0}


def _batch(n):
    return build_batch([[1]] * n, [[2]] * n, [[3]] * n, torch.zeros(n), torch.arange(n), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))


@pytest.mark.parametrize(("context", "expected"), [("sampling", "sample"), ("plain", "plain")])
def test_old_logprobs_context_and_reference(context, expected):
    policy = RecordingPolicy()
    batch, entropy = with_old_logprobs(policy, _batch(3), AlgorithmConfig(old_logprob_context=context))
    assert policy.calls == [(expected, False)] and batch.ref_logprobs is None and entropy.shape == (3, 1)
    assert batch.old_logprobs.unique().tolist() == [{"sample": -2.0, "plain": -1.0}[expected]]
    policy = RecordingPolicy()
    batch, _ = with_old_logprobs(policy, _batch(3), AlgorithmConfig(old_logprob_context=context, kl_coef=0.1))
    assert policy.calls == [(expected, False), ("plain", True)] and batch.ref_logprobs.unique().tolist() == [-11.0]


def test_update_runs_epochs_of_shuffled_mini_batches():
    policy = RecordingPolicy()
    out = update(policy, _batch(10), lambda *a: None, epochs=2, mini_batch_size=4, micro_batch_size=3, with_entropy=True, seed=5)
    assert len(out) == 6  # 2 epochs x ceil(10 / 4)
    groups = [g for g, _, _ in policy.steps]
    assert [len(g) for g in groups] == [4, 4, 2] * 2
    for epoch in (groups[:3], groups[3:]):  # every rollout once per epoch
        assert sorted(sum(epoch, [])) == list(range(10))
    assert groups[:3] != groups[3:]  # reshuffled
    assert all(m == 3 and e for _, m, e in policy.steps)
    again = RecordingPolicy()
    update(again, _batch(10), lambda *a: None, epochs=2, mini_batch_size=4, micro_batch_size=3, with_entropy=True, seed=5)
    assert again.steps == policy.steps  # seeded
    whole = RecordingPolicy()
    assert len(update(whole, _batch(10), lambda *a: None, epochs=1, mini_batch_size=None, micro_batch_size=3, with_entropy=False, seed=0)) == 1
    assert update(RecordingPolicy(), _batch(0), lambda *a: None, epochs=3, mini_batch_size=None, micro_batch_size=1, with_entropy=False, seed=0) == []


def test_step_metrics_hand_computed():
    # B = 2, k = 2; prompt 1 fails and is guided.
    plain = Rollouts([[1]] * 4, [[1]] * 4, [[5, 1], [5, 5, 5], [5], [5, 5]], [True, False, True, True], [""] * 4, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    guided = Rollouts([[1]] * 2, [[2]] * 2, [[5, 5, 5, 5], [5, 5]], [True, True], [""] * 2, torch.tensor([1.0, 0.0]))
    guide = torch.tensor([False, True])
    groups = groups_and_advantages(plain.rewards, guided.rewards, guide, AlgorithmConfig(group_size=2))
    entropy = torch.zeros(6, 4)
    entropy[0, :2] = 1.0  # plain rollout 0's tokens
    entropy[1, :4] = 2.0  # rollout 1 has 3 tokens: the 4th value is padding and must not count
    entropy[4] = 9.0  # guided rows do not count
    timer = StepTimer("generation", "scoring")
    timer.seconds["generation"] = 2.0
    m = step_metrics(plain, guided, guide, groups, entropy, trained=6, updates=[{"optim/skipped": 0.0, "loss/policy": 0.5}, {"optim/skipped": 1.0, "loss/policy": 1.5}], timer=timer)
    assert m["train/reward"] == 0.5 and m["train/reward_guided"] == 0.5
    assert m["train/guided_frac"] == 0.5 and m["train/pass_at_k"] == 0.5
    assert m["train/response_length"] == 2.0 and m["train/response_length_guided"] == 3.0
    assert m["train/truncated_frac"] == pytest.approx(1 / 6)
    assert m["train/entropy"] == pytest.approx((2 * 1.0 + 3 * 2.0) / 8)  # 8 plain tokens
    assert m["train/rollouts"] == 6 and m["train/trained_rollouts"] == 6 and m["train/filtered_frac"] == 0
    assert m["perf/tokens_per_s"] == pytest.approx(14 / 2.0)  # 8 plain + 6 guided tokens
    assert m["time/generation"] == 2.0 and m["time/scoring"] == 0.0
    assert m["optim/skipped"] == 1.0 and m["optim/updates"] == 2.0 and m["loss/policy"] == 1.0
    no_guidance = step_metrics(plain, _rollouts([]), torch.tensor([False, False]), groups_and_advantages(plain.rewards, torch.zeros(0), torch.tensor([False, False]), AlgorithmConfig(group_size=2)), entropy[:4], 4, [], timer)
    assert math.isnan(no_guidance["train/reward_guided"]) and no_guidance["optim/updates"] == 0.0


def test_step_timer_accumulates_and_survives_exceptions():
    timer = StepTimer("a")
    for _ in range(2):
        with timer("a"):
            sum(range(10_000))
    once = timer.seconds["a"]
    with pytest.raises(KeyError), timer("b"):
        raise KeyError("x")
    assert set(timer.seconds) == {"a", "b"} and once > 0.0 and timer.seconds["b"] > 0.0
