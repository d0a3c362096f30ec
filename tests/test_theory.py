"""Theorem 1 checked exactly (nemo_guide.theory): the closed-form expected updates against a
brute-force enumeration and the trainer's own loss under sampling, hand-derived closed forms,
and the cases where the theorem's assumption holds or fails."""

import itertools
import math

import pytest
import torch

from nemo_guide.core.guidance import GuidanceThreshold as T
from nemo_guide.core.guidance import GuidedGroupMode as M
from nemo_guide.theory import (
    Bandit,
    UpdateRule,
    assumption_value,
    cases,
    expected_logit_update,
    expected_return,
    expected_update,
    grpo,
    improvement,
    main,
    monte_carlo_update,
    return_gradient,
    tabular,
    unsolved,
)

F64 = torch.float64


def _random_tabular(seed: int, q: int = 2, r: int = 3, hint_scale: float = 2.0) -> Bandit:
    """Random logits and hints; every prompt has at least one correct and one incorrect response."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(q, r, generator=g, dtype=F64) * 1.5
    bias = torch.randn(q, r, generator=g, dtype=F64) * hint_scale
    rewards = (torch.rand(q, r, generator=g) < 0.4).to(F64)
    rewards[:, 0], rewards[:, -1] = 1.0, 0.0
    return tabular(logits, bias, rewards)


def _shared(seed: int) -> Bandit:
    """Two prompts, three responses, two parameters shared by all logits; one response the hint cannot sample."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 2, generator=g, dtype=F64)
    offset = torch.randn(2, 3, generator=g, dtype=F64)
    bias = torch.randn(2, 3, generator=g, dtype=F64)
    bias[1, 0] = float("-inf")  # prompt 1's first correct answer is out of the hint's reach
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    return Bandit(features, offset, bias, rewards, torch.randn(2, generator=g, dtype=F64))


def _z_scores(rewards: torch.Tensor, normalize_std: bool, eps: float) -> torch.Tensor:
    """(r - mean) / (unbiased std + eps) along the last axis, 0 for an all-equal group. Shape: like ``rewards``."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if normalize_std:
        n = rewards.shape[-1]
        std = (centred.pow(2).sum(-1, keepdim=True) / max(n - 1, 1)).sqrt()
        centred = centred / (std + eps)
    flat = (rewards == rewards[..., :1]).all(-1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centred), centred)


def _brute_force_update(bandit: Bandit, rule: UpdateRule) -> torch.Tensor:
    """Autograd of the exactly enumerated expected Eq. 6 surrogate at theta_old: every tuple of k plain
    responses, and of k guided ones where the threshold fires, weighted by its probability. Shape: ``[D]``."""
    k = rule.k
    theta = bandit.theta.clone().requires_grad_(True)
    logp = bandit.plain_logits(theta).log_softmax(-1)  # [Q, R]
    pi_old, sigma = bandit.plain_probs(), bandit.hinted_probs()
    tuples = torch.tensor(list(itertools.product(range(pi_old.shape[1]), repeat=k)))  # [R^k, k]
    total = torch.zeros((), dtype=F64)
    for q in range(bandit.num_prompts):
        reward = bandit.rewards[q]
        p_plain, p_guided = pi_old[q, tuples].prod(-1), sigma[q, tuples].prod(-1)  # [R^k]
        ratio_plain = (logp[q, tuples] - pi_old[q, tuples].log()).exp()  # [R^k, k]: pi_theta / pi_old(.|x)
        safe_log_sigma = torch.where(sigma[q] > 0, sigma[q].log(), torch.zeros_like(sigma[q]))  # unreachable: weight 0
        ratio_guided = (logp[q, tuples] - safe_log_sigma[tuples]).exp()  # [R^k, k]: pi_theta(o|x) / pi_old(o|x~)
        r_plain = reward[tuples]  # [R^k, k]
        frac = r_plain.mean(-1)
        fires = {T.NEVER: frac < -1, T.ALL_INCORRECT: frac == 0, T.MOSTLY_INCORRECT: frac < 0.25, T.ALWAYS: frac >= 0}[rule.threshold]
        unguided = (_z_scores(r_plain, rule.normalize_std, rule.eps) * ratio_plain).sum(-1)  # [R^k]
        total = total + (p_plain * unguided * ~fires).sum()
        r_guided = reward[tuples].unsqueeze(0).expand(len(tuples), -1, -1)  # [plain tuple, guided tuple, k]
        if rule.group is M.UNION:
            both = torch.cat([r_plain.unsqueeze(1).expand_as(r_guided), r_guided], -1)  # [R^k, R^k, 2k]
            adv = _z_scores(both, rule.normalize_std, rule.eps)
            term = (adv[..., :k] * ratio_plain.unsqueeze(1)).sum(-1) + (adv[..., k:] * ratio_guided.unsqueeze(0)).sum(-1)
        else:
            term = (_z_scores(r_guided, rule.normalize_std, rule.eps) * ratio_guided.unsqueeze(0)).sum(-1)  # [R^k, R^k]
        weight = (p_plain * fires).unsqueeze(1) * p_guided.unsqueeze(0)  # [R^k, R^k]
        total = total + (weight * term).sum()
    (grad,) = torch.autograd.grad(total / (k * bandit.num_prompts), theta)
    return grad


RULES = [
    grpo(3),
    UpdateRule(k=3),
    UpdateRule(k=3, group=M.REPLACE),
    UpdateRule(k=3, threshold=T.MOSTLY_INCORRECT),
    UpdateRule(k=3, threshold=T.ALWAYS),
    UpdateRule(k=3, threshold=T.ALWAYS, group=M.REPLACE),
    UpdateRule(k=3, normalize_std=False),
    UpdateRule(k=2, normalize_std=False, group=M.REPLACE),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
@pytest.mark.parametrize("make", [_random_tabular, _shared], ids=["tabular", "shared"])
def test_expected_update_equals_brute_force_enumeration(rule, make):
    bandit = make(seed=3)
    torch.testing.assert_close(expected_update(bandit, rule), _brute_force_update(bandit, rule), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_return_gradient_and_mean_only_grpo_are_autograd_of_J(seed):
    # Mean-only advantages r_i - mean(r): E[(1/k) sum_i (r_i - r_bar) grad log pi(o_i)] = (1 - 1/k) grad p
    # (the own sample in the mean costs 1/k), so GRPO's expected update is (k-1)/k grad J exactly.
    bandit = _shared(seed) if seed % 2 else _random_tabular(seed, q=3, r=4)
    theta = bandit.theta.clone().requires_grad_(True)
    (grad_j,) = torch.autograd.grad(expected_return(bandit, theta), theta)
    torch.testing.assert_close(return_gradient(bandit), grad_j, rtol=1e-12, atol=1e-15)
    for k in (2, 3, 5):
        torch.testing.assert_close(expected_update(bandit, grpo(k, normalize_std=False)), (k - 1) / k * grad_j, rtol=1e-10, atol=1e-14)


def test_mean_only_guide_closed_form():
    # all_incorrect + union, mean-only advantages, tabular, hint with full support. Given all k plain fail and
    # c~ ~ Bin(k, p~) guided successes, the 2k group's mean is c~/2k: correct guided A = 1 - c~/2k, the other
    # 2k - c~ rollouts A = -c~/2k. Their expected IS-corrected gradients are +grad p / p~ (correct guided),
    # -grad p / (1 - p~) (incorrect guided) and -grad p / (1 - p) (failed plain), so with E c~ = k p~,
    # E c~^2 = k p~ (1 - p~) + k^2 p~^2:
    #   (1/k) E[c~ (1 - c~/2k)] / p~           = 1 - (1 - p~ + k p~) / 2k
    #   (1/k) E[(k - c~) c~ / 2k] / (1 - p~)   = p~ (k - 1) / 2k
    #   (1/k) k E[c~ / 2k] / (1 - p)           = p~ / (2 (1 - p))
    # sum: 1 - 1/2k + p~ / (2 (1 - p)). GRPO's branch c = 0 is a flat group (0), so
    #   E[g_q] = [(k-1)/k + (1-p)^k (1 - 1/2k + p~ / (2(1-p)))] grad_logits p_q.
    bandit = _random_tabular(seed=11, q=3, r=4)
    pi, r = bandit.plain_probs(), bandit.rewards
    p, pt = (pi * r).sum(-1), (bandit.hinted_probs() * r).sum(-1)
    grad_p = pi * (r - p.unsqueeze(-1))  # [Q, R]
    for k in (1, 2, 4):
        scale = (k - 1) / k + (1 - p) ** k * (1 - 1 / (2 * k) + pt / (2 * (1 - p)))
        got = expected_logit_update(bandit, UpdateRule(k=k, normalize_std=False))
        torch.testing.assert_close(got, scale.unsqueeze(-1) * grad_p, rtol=1e-10, atol=1e-14)


def test_first_order_term_is_the_small_step_limit():
    bandit, rule = _shared(5), UpdateRule(k=4)
    g = expected_update(bandit, rule)
    slope = return_gradient(bandit) @ g
    errors = [abs(float(improvement(bandit, g, eta)) / eta - float(slope)) for eta in (1e-2, 1e-3)]
    assert errors[1] < 0.2 * errors[0]  # the remainder is O(eta)
    assert errors[1] < 1e-2 * abs(float(slope))


@pytest.mark.parametrize("seed", range(12))
def test_guide_beats_grpo_at_first_order_when_the_assumption_holds_tabular(seed):
    # Property over random tabular policies, hints with full support (finite bias), k and normalisation:
    # the paper's rule has a positive guided advantage and a larger first-order improvement.
    g = torch.Generator().manual_seed(100 + seed)
    q, r, k = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 5), (2, 6), (2, 5)))
    bandit = _random_tabular(seed, q=q, r=r, hint_scale=3.0)
    normalize_std = bool(seed % 2)
    guide = UpdateRule(k=k, normalize_std=normalize_std)
    grad = return_gradient(bandit)
    assert assumption_value(bandit, guide) > 0
    first_guide = grad @ expected_update(bandit, guide)
    first_grpo = grad @ expected_update(bandit, grpo(k, normalize_std=normalize_std))
    assert first_guide > first_grpo > 0
    eta = 1e-3
    assert improvement(bandit, expected_update(bandit, guide), eta) > improvement(bandit, expected_update(bandit, grpo(k, normalize_std=normalize_std)), eta)


def _case(name):
    return next(c for c in cases() if c.name == name)


def test_hint_never_correct_assumption_fails_and_guide_equals_grpo():
    case = _case("hint never correct")
    assert float(assumption_value(case.bandit, case.guide)) == 0.0
    torch.testing.assert_close(expected_update(case.bandit, case.guide), expected_update(case.bandit, case.baseline), rtol=0, atol=1e-15)


def test_replace_group_assumption_fails_yet_guide_beats_grpo():
    # A z-normalised group's advantages sum to 0: the guided rollouts alone have mean advantage 0.
    case = _case("replace group")
    assert abs(float(assumption_value(case.bandit, case.guide))) < 1e-12
    grad = return_gradient(case.bandit)
    assert grad @ expected_update(case.bandit, case.guide) > 1.2 * (grad @ expected_update(case.bandit, case.baseline))


def test_shared_parameter_assumption_holds_yet_guide_loses():
    case = _case("shared parameter")
    assert unsolved(case.bandit).all()  # both prompts are in U: J's change is the theorem's Delta R / Q
    assert assumption_value(case.bandit, case.guide) > 0.3
    grad = return_gradient(case.bandit)
    g_guide, g_grpo = expected_update(case.bandit, case.guide), expected_update(case.bandit, case.baseline)
    assert grad @ g_guide < 0 < grad @ g_grpo
    # The loss is the cross-prompt term the proof's Eq. 34 drops: Guide's extra step raises p_0 (the
    # prompt guided most often) and lowers p_1 by more. Per-prompt gradients: J with one prompt kept.
    extra = g_guide - g_grpo  # [D]
    b = case.bandit
    per_prompt = [Bandit(b.features[i : i + 1], b.offset[i : i + 1], b.hint_bias[i : i + 1], b.rewards[i : i + 1], b.theta) for i in range(2)]
    gain_0, gain_1 = (return_gradient(one) @ extra for one in per_prompt)
    assert gain_0 > 0 > gain_1 and abs(gain_1) > gain_0
    # The same prompts with a parameter each (no sharing): Guide wins again.
    split = tabular(b.plain_logits(), b.hint_bias, b.rewards)
    split_grad = return_gradient(split)
    assert split_grad @ expected_update(split, case.guide) > split_grad @ expected_update(split, case.baseline)
    for eta in (1e-3, 0.1, 1.0):
        assert improvement(b, g_guide, eta) < 0 < improvement(b, g_grpo, eta)


def test_every_case_has_all_prompts_unsolved():
    # So the table's J (mean over all prompts) is the theorem's Delta R over U, divided by Q.
    for case in cases():
        assert unsolved(case.bandit).all(), case.name
    solved = tabular(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert unsolved(solved).tolist() == [False, True]


def test_always_replace_assumption_fails_and_guide_loses():
    case = _case("always, replace, mild hint")
    assert abs(float(assumption_value(case.bandit, case.guide))) < 1e-12
    grad = return_gradient(case.bandit)
    assert grad @ expected_update(case.bandit, case.guide) < 0.99 * (grad @ expected_update(case.bandit, case.baseline))


def test_grpo_step_per_unit_gradient_is_smallest_at_one_half():
    # Why "always, replace" loses with a mild hint: a z-normalised group's expected step along grad p
    # is smallest at p = 1/2 (k = 4: 1.40 there, 1.48 at p = 0.05), and the hint moves guided groups
    # towards 1/2. Mean-only advantages give (k-1)/k = 0.75 at every p.
    def scale(p, normalize_std):
        bandit = tabular(torch.tensor([[math.log(p / (1 - p)), 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
        pi = bandit.plain_probs()
        grad_p = pi * (bandit.rewards - (pi * bandit.rewards).sum(-1, keepdim=True))  # [1, 2]
        return float(expected_logit_update(bandit, grpo(4, normalize_std=normalize_std))[0, 0] / grad_p[0, 0])

    assert scale(0.5, True) == pytest.approx(1.3995, abs=1e-4)
    assert scale(0.05, True) == pytest.approx(1.4809, abs=1e-4)
    assert scale(0.3, True) == pytest.approx(scale(0.7, True), rel=1e-6)  # symmetric but for eps
    for p in (0.05, 0.5, 0.9):
        assert scale(p, False) == pytest.approx(0.75, rel=1e-9)


def test_negative_guided_advantage_does_not_make_guide_lose_here():
    case = _case("always, misleading hint")
    assert assumption_value(case.bandit, case.guide) < -0.1
    grad = return_gradient(case.bandit)
    assert grad @ expected_update(case.bandit, case.guide) > grad @ expected_update(case.bandit, case.baseline)


@pytest.mark.parametrize(
    "name, rule",
    [("helpful hint", UpdateRule(k=4)), ("helpful hint", grpo(4)), ("misleading hint", UpdateRule(k=3, threshold=T.MOSTLY_INCORRECT)), ("shared parameter", UpdateRule(k=4))],
)
def test_monte_carlo_of_the_trainer_loss_agrees(name, rule):
    # The sampled update the trainer computes (group_advantages + guide_policy_loss, aggregation "paper")
    # averaged over many steps: within 5 standard errors (from 16 independent chunks) of the exact sums.
    bandit = _case(name).bandit
    exact = expected_update(bandit, rule)
    gen = torch.Generator().manual_seed(0)
    chunks = torch.stack([monte_carlo_update(bandit, rule, 2500, gen) for _ in range(16)])  # [16, D]
    mean, se = chunks.mean(0), chunks.std(0) / math.sqrt(16)
    assert ((mean - exact).abs() <= 5 * se + 1e-9).all(), (mean, exact, se)
    if rule.threshold is T.ALL_INCORRECT and name == "helpful hint":
        # Power: the estimate tells the paper's union group from the replace layout.
        other = expected_update(bandit, UpdateRule(k=4, group=M.REPLACE))
        assert ((mean - other).abs() > 5 * se).any()


def test_invalid_inputs_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"threshold = 'sometimes'; valid: .*all_incorrect"):
        UpdateRule(threshold="sometimes")
    with pytest.raises(ValueError, match=r"k = 0"):
        UpdateRule(k=0)
    with pytest.raises(ValueError, match=r"rewards must be 0 or 1, got the values \[0.0, 0.5\]"):
        tabular(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[0.5, 0.0]]))
    with pytest.raises(ValueError, match=r"theta must have shape \[4\]"):
        Bandit(torch.zeros(1, 2, 4), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="whole row of -inf"):
        tabular(torch.zeros(1, 2), torch.full((1, 2), float("-inf")), torch.tensor([[1.0, 0.0]]))


def test_cli_prints_every_case_and_writes_the_figure(tmp_path, capsys):
    out = tmp_path / "fig" / "theorem1.png"
    assert main(["--out", str(out), "--eta", "0.01", "1"]) == 0
    text = capsys.readouterr().out
    for case in cases():
        assert text.count(f"| {case.name} |") == 2
    assert "| shared parameter | all_incorrect/union, k=4 | 2/2 | 0.01 |" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
