"""Sampler/trainer mismatch: truncated importance sampling (hand-computed), the loss with its
weights, and the TensorRT-LLM probe's comparison, report and refusal (a fake host on CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_guide.aligner.config import ProbeSettings
from nemo_guide.aligner.probe import ProbeError, ProbeReport, check, compare, run_probe
from nemo_guide.core.loss import guide_policy_loss
from nemo_guide.core.mismatch import greedy_disagreement, logprob_gap, truncated_importance_weights

T, F = True, False


def test_tis_weights_by_hand():
    # row 0 (plain): trainer - sampler = [log 1.5, log 0.5, log 4 (masked)]: w = [1.5, 0.5, 1 (not counted)]
    # row 1 (guided, trainer behind the hint): [log 3, 0]: w = [min(3, 2) = 2 (clipped), 1]
    trainer = torch.tensor([[math.log(1.5), math.log(0.5), math.log(4.0)], [math.log(3.0), 0.0, 0.0]])
    sampler = torch.zeros(2, 3)
    mask = torch.tensor([[T, T, F], [T, T, F]])
    w, m = truncated_importance_weights(trainer, sampler, mask, torch.tensor([F, T]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 1.0], [2.0, 1.0, 1.0]]))
    # |diff| over counted tokens: log 1.5 = 0.405, log 2 = 0.693, log 3 = 1.099, 0 -> mean 0.549, max 1.099
    assert m["rollout/logprob_diff_mean"].item() == pytest.approx((math.log(1.5) + math.log(2) + math.log(3)) / 4)
    assert m["rollout/logprob_diff_max"].item() == pytest.approx(math.log(3))
    assert m["rollout/logprob_diff_mean_guided"].item() == pytest.approx(math.log(3) / 2)
    assert m["rollout/tis_clip_frac"].item() == pytest.approx(1 / 4)
    assert m["rollout/tis_weight_mean"].item() == pytest.approx((1.5 + 0.5 + 2 + 1) / 4)
    assert not w.requires_grad


def test_tis_degenerate_cases_are_defined():
    w, m = truncated_importance_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool), torch.tensor([T]))
    assert torch.equal(w, torch.ones(1, 2)) and math.isnan(m["rollout/logprob_diff_mean"].item()) and m["rollout/tis_clip_frac"].item() == 0
    # an equal sampler gives weight 1 everywhere: the correction is then the identity
    lp = torch.randn(3, 4)
    assert torch.equal(truncated_importance_weights(lp, lp, torch.ones(3, 4, dtype=torch.bool), torch.tensor([F, T, F]))[0], torch.ones(3, 4))
    with pytest.raises(ValueError, match="cap = 0"):
        truncated_importance_weights(lp, lp, torch.ones(3, 4, dtype=torch.bool), torch.tensor([F, T, F]), cap=0)


def test_is_weights_scale_each_tokens_policy_loss():
    # ratio 1 everywhere, A = [1, -1]: token losses [-1, -1; 1, 1]; weights [2, 0.5; 1, 0] -> (-2 - 0.5 + 1 + 0) / 4
    lp = torch.zeros(2, 2, requires_grad=True)
    args = (lp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool), torch.tensor([F, T]))
    loss, _ = guide_policy_loss(*args, is_weights=torch.tensor([[2.0, 0.5], [1.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.5 / 4)
    assert guide_policy_loss(*args)[0].item() == pytest.approx(0.0)  # without weights
    with pytest.raises(ValueError, match="is_weights must have shape"):
        guide_policy_loss(*args, is_weights=torch.ones(2, 3))


def test_greedy_disagreement_counts_decisions_up_to_the_first_divergence():
    # row 0: equal (3 decisions); row 1: differs at t=1 (2 decisions, 1 disagreement; later tokens not counted);
    # row 2: engine stops after 1 token, trainer goes on (2 decisions, 1 disagreement); row 3: both empty
    engine = torch.tensor([[1, 2, 3], [1, 5, 6], [4, 0, 0], [0, 0, 0]])
    trainer = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 7, 0], [0, 0, 0]])
    decisions, differ = greedy_disagreement(engine, torch.tensor([3, 3, 1, 0]), trainer, torch.tensor([3, 3, 2, 0]))
    assert (decisions.item(), differ.item()) == (3 + 2 + 2, 2)


def test_logprob_gap_by_hand():
    gap = logprob_gap(torch.tensor([[-1.0, -2.0], [-0.5, 9.0]]), torch.tensor([[-1.5, -2.0], [-0.25, 0.0]]), torch.tensor([[T, T], [T, F]]))
    assert gap["mean"].item() == pytest.approx(0.75 / 3) and gap["max"].item() == pytest.approx(0.5) and gap["tokens"].item() == 3


def _report(mean=0.01, mx=0.2, differ=1, decisions=100):
    return ProbeReport(step=0, prompts=8, tokens=256, logprob_diff_mean=mean, logprob_diff_max=mx, greedy_decisions=decisions, greedy_disagreements=differ)


def test_probe_report_format_and_refusal():
    settings = ProbeSettings()
    text = _report().format(settings)
    assert text.splitlines() == [
        "TensorRT-LLM probe at step 0: 8 prompts, 256 sampled tokens, 100 greedy decisions",
        "  log-prob |engine - trainer| per token: mean 0.0100, max 0.2000 (tolerances 0.05, 1.5)",
        "  greedy tokens differing: 1 of 100 decisions = 0.0100 (tolerance 0.1)",
        "  result: pass",
    ]
    check(_report(), settings)
    with pytest.raises(ProbeError) as err:
        check(_report(mean=0.9, mx=4.0, differ=30), settings)
    message = str(err.value)
    for key in ("probe_tolerance = 0.05", "probe_max_tolerance = 1.5", "probe_greedy_tolerance = 0.1", "model.qkv_bias"):
        assert key in message
    assert _report(mean=float("nan")).failures(settings)  # NaN never passes
    assert "result: FAIL" in _report(mean=0.9).format(settings)


class FakeHost:
    """An engine that is the trainer plus ``shift`` nats on every sampled log-prob and picks token 9
    instead of the trainer's greedy token after ``flip_after`` tokens."""

    def __init__(self, shift=0.0, flip_after=None):
        self.shift, self.flip_after = shift, flip_after

    def greedy(self, prompts, *, max_new_tokens, engine):
        out = [[(p[-1] + t) % 7 for t in range(max_new_tokens)] for p in prompts]
        if engine and self.flip_after is not None:
            out = [r[: self.flip_after] + [9] * (max_new_tokens - self.flip_after) for r in out]
        return out

    def generate_with_logprobs(self, prompts, *, max_new_tokens, temperature, top_p, seed):
        responses = [[1, 2, 3][: 1 + i % 3] for i in range(len(prompts))]
        return responses, [True] * len(prompts), [[-0.5 * (t + 1) + self.shift for t in range(len(r))] for r in responses]

    def logprobs(self, batch, context, *, reference=False, with_entropy=False):
        assert context == "sample"
        lp = torch.zeros(len(batch), batch.response_length)
        for i, r in enumerate(batch.response_ids):
            lp[i, : len(r)] = torch.tensor([-0.5 * (t + 1) for t in range(len(r))])
        return lp, None


def test_run_probe_passes_a_faithful_engine_and_refuses_a_shifted_one():
    prompts = [[1, 2], [3], [4, 5, 6], [2]]
    kwargs = dict(step=0, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    good = run_probe(FakeHost(), prompts, ProbeSettings(), **kwargs)
    assert (good.logprob_diff_mean, good.logprob_diff_max, good.greedy_disagreements, good.greedy_decisions, good.tokens) == (0.0, 0.0, 0, 16, 1 + 2 + 3 + 1)
    check(good, ProbeSettings())
    bad = run_probe(FakeHost(shift=0.3, flip_after=1), prompts, ProbeSettings(), **kwargs)
    assert bad.logprob_diff_mean == pytest.approx(0.3) and bad.greedy_disagreements == 4 and bad.greedy_decisions == 8
    with pytest.raises(ProbeError, match="mean .* 0.3000 > model.ppo.trt_llm.probe_tolerance"):
        check(bad, ProbeSettings())


def test_probe_settings_parse_and_name_bad_keys():
    settings, problems = ProbeSettings.parse({"probe_every": 10, "probe_tolerance": 0.1, "probe_prompts": 16})
    assert problems == [] and (settings.every, settings.tolerance, settings.prompts, settings.max_tolerance) == (10, 0.1, 16, 1.5)
    _, problems = ProbeSettings.parse({"probe": "yes", "probe_every": -1, "probe_greedy_tolerance": True})
    assert problems == ["model.ppo.trt_llm.probe = 'yes': expected bool", "model.ppo.trt_llm.probe_greedy_tolerance = True: expected float",
                        "model.ppo.trt_llm.probe_every = -1: must be >= 0 (0: at start-up only)"]


def test_compare_is_the_core_statistics():
    report = compare(3, [[1, 2]], [[1, 3]], torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.5]]), torch.tensor([[T, T]]))
    assert (report.step, report.greedy_decisions, report.greedy_disagreements, report.tokens) == (3, 2, 1, 2)
    assert report.logprob_diff_mean == pytest.approx(0.25) and report.metrics()["probe/greedy_diff_frac"] == 0.5
