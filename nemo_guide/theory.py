"""Theorem 1 of the paper checked exactly on a bandit policy (issue 15, item 4).

Theorem 1 (paper Section 2.2, proof in Appendix B.3): if the guided rollouts' advantage is
positive in expectation over the unsolved prompts, ``E_{q in U} E_{y ~ pi(.|x~_q)} [A~_q(y; G_q)] > 0``,
then for small step sizes the one-step expected improvement of the plain policy's reward
under Guide-GRPO exceeds that of vanilla GRPO, to first order in the step size eta.

The model here has no sampling noise. Each of ``Q`` prompts has ``R`` fixed one-token
responses with 0/1 rewards; the plain policy is a softmax over logits linear in ``D``
parameters, ``logits = features @ theta + offset``, and the hinted context adds a fixed
``hint_bias`` to the logits (the hint's parametrisation is irrelevant to the update: the
objective differentiates pi_theta(o | plain prompt) only). ``features`` = identity gives a
tabular policy (no parameter shared between prompts).

For an update rule (k rollouts, guidance threshold, guided group layout, std
normalisation) the *expected* update direction ``E[g]`` of the Guide objective (paper Eq.
6, no clipping on guided rollouts, importance ratio pi_theta(o|x_q) / pi_old(o|s_q),
gradient at theta = theta_old, the first optimiser step) is computed in closed form: the
group advantage depends only on how many rollouts of the group are correct, and given
those counts each rollout is an independent draw from its context's policy restricted
to the correct (or incorrect) responses. So the expectation is a double binomial sum over
the plain count ``c`` and the guided count ``c~``, no sampling. Vanilla GRPO is the same
rule with threshold ``never``. Then

    J(theta)           = mean_q sum_y pi_theta(y | x_q) r_q(y)       (plain expected reward)
    improvement(eta)   = J(theta + eta E[g]) - J(theta)
    first-order term   = eta <grad J(theta), E[g]>

``improvement`` moves along the expected direction; it agrees with the expected
improvement of a sampled update, E[J(theta + eta g)] - J(theta), to first order in eta,
which is the order the theorem speaks about.

What the exact sums show (the tests pin each). In every case all prompts are unsolved (greedy
answer wrong), so J's change is the theorem's Delta R over U divided by Q.
- tabular policy, paper's rule (``all_incorrect``, guided rollouts join the failed plain ones
  in one group): the guided rollouts' centred rewards sum to ``c~ / 2``, so the assumption
  holds whenever a hint has any mass on a correct answer, and Guide's first-order term
  exceeds GRPO's, even when the hint lowers the success rate six-fold. With exact importance
  weights each guided rollout's expected contribution is a positive multiple of grad p_q
  whatever the hint: the hint enters only through the group's advantage values (and the
  variance, which this model does not see);
- a hint with no mass on the correct answers: the assumption fails (the guided advantage is
  0) and the two updates coincide, so the strict inequality fails;
- the authors' ``replace`` group: the guided advantage is 0 by construction (a z-normalised
  group sums to 0), the assumption never holds, yet Guide still beats GRPO: the assumption
  is not necessary;
- guidance on every prompt (``always``) with a hint that lowers the success rate: A~ < 0, the
  assumption fails, and Guide still beats GRPO; with ``always`` and ``replace`` and a mild
  hint, A~ = 0 and Guide loses slightly: a z-normalised group's expected step along grad p is
  smallest at p = 1/2, and the hint moves the guided groups towards 1/2;
- one parameter shared by two unsolved prompts: the assumption holds and Guide's first-order
  change of J is *negative* while GRPO's is positive: the proof's Eq. 34 drops the
  cross-prompt terms <grad log pi(y_q|x_q), grad log pi(y_q'|x_q')>, so the assumption is
  not sufficient once prompts share parameters (as they do in a network).

Run ``python -m nemo_guide.theory --eta 0.01 1 --out docs/theorem1.png`` for the table and the figure.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_guide.core.advantages import group_advantages
from nemo_guide.core.guidance import THRESHOLDS, GuidanceThreshold, GuidedGroupMode
from nemo_guide.core.loss import Aggregation, guide_policy_loss

DTYPE = torch.float64
# The guided advantage counts as positive above this: a z-normalised group's mean advantage
# is 0 up to float64 rounding (about 1e-17), which must not read as "the assumption holds".
ASSUMPTION_TOL = 1e-12


@dataclass(frozen=True)
class Bandit:
    """A softmax policy over ``R`` fixed responses for each of ``Q`` prompts.

    Plain logits ``features @ theta + offset``, hinted logits the same plus ``hint_bias``.
    All tensors are converted to float64.
    """

    features: torch.Tensor
    """d logit / d theta. Shape: ``[Q, R, D]``."""
    offset: torch.Tensor
    """Fixed part of the plain logits. Shape: ``[Q, R]``."""
    hint_bias: torch.Tensor
    """Added to the logits in the hinted context; ``-inf`` removes a response from it. Shape: ``[Q, R]``."""
    rewards: torch.Tensor
    """0/1 reward of each response. Shape: ``[Q, R]``."""
    theta: torch.Tensor
    """The current (= old) parameters. Shape: ``[D]``."""

    def __post_init__(self) -> None:
        for name in ("features", "offset", "hint_bias", "rewards", "theta"):
            object.__setattr__(self, name, torch.as_tensor(getattr(self, name), dtype=DTYPE))
        problems = []
        if self.features.dim() != 3:
            problems.append(f"features must have shape [Q, R, D], got {tuple(self.features.shape)}")
        else:
            q, r, d = self.features.shape
            for name, want in (("offset", (q, r)), ("hint_bias", (q, r)), ("rewards", (q, r)), ("theta", (d,))):
                got = tuple(getattr(self, name).shape)
                if got != want:
                    problems.append(f"{name} must have shape {list(want)} (from features [Q, R, D]), got {list(got)}")
        if not ((self.rewards == 0) | (self.rewards == 1)).all():
            problems.append(f"rewards must be 0 or 1, got the values {sorted(set(self.rewards.flatten().tolist()))}")
        if not problems and (self.hint_bias == float("-inf")).all(-1).any():
            problems.append("hint_bias removes every response of some prompt (a whole row of -inf); keep at least one finite entry per row")
        if problems:
            raise ValueError("invalid Bandit: " + "; ".join(problems))

    @property
    def num_prompts(self) -> int:
        return self.features.shape[0]

    def plain_logits(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Shape: ``[Q, R]``."""
        theta = self.theta if theta is None else theta
        return torch.einsum("qrd,d->qr", self.features, theta) + self.offset

    def plain_probs(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """pi_theta(y | x_q). Shape: ``[Q, R]``."""
        return self.plain_logits(theta).softmax(-1)

    def hinted_probs(self) -> torch.Tensor:
        """pi_old(y | x~_q), the guided rollouts' sampling policy. Shape: ``[Q, R]``."""
        return (self.plain_logits() + self.hint_bias).softmax(-1)


def tabular(plain_logits: torch.Tensor, hint_bias: torch.Tensor, rewards: torch.Tensor) -> Bandit:
    """A bandit with one parameter per (prompt, response): ``theta = plain_logits.flatten()``.

    Args:
        plain_logits, hint_bias, rewards: Shape: ``[Q, R]`` each.
    """
    plain_logits = torch.as_tensor(plain_logits, dtype=DTYPE)
    q, r = plain_logits.shape
    features = torch.eye(q * r, dtype=DTYPE).reshape(q, r, q * r)  # [Q, R, Q*R]
    return Bandit(features, torch.zeros(q, r), hint_bias, rewards, plain_logits.flatten())


@dataclass(frozen=True)
class UpdateRule:
    """How one step's rollouts are drawn and grouped (the GRPO/Guide-GRPO knobs that matter here)."""

    k: int = 4
    """Plain rollouts per prompt, and guided rollouts per guided prompt."""
    threshold: GuidanceThreshold = GuidanceThreshold.ALL_INCORRECT
    """Which prompts get guided rollouts; ``never`` is vanilla GRPO."""
    group: GuidedGroupMode = GuidedGroupMode.UNION
    """``union`` (paper Eq. 6: one group of k plain + k guided) or ``replace`` (authors' code)."""
    normalize_std: bool = True
    """Divide advantages by the group's unbiased std (GRPO); False: mean only (Dr. GRPO)."""
    eps: float = 1e-6
    """Added to the std, as in :func:`nemo_guide.core.advantages.group_advantages`."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.k, int) or self.k < 1:
            problems.append(f"k = {self.k!r}: give a whole number of rollouts >= 1")
        for name, enum in (("threshold", GuidanceThreshold), ("group", GuidedGroupMode)):
            try:
                object.__setattr__(self, name, enum(getattr(self, name)))
            except ValueError:
                problems.append(f"{name} = {getattr(self, name)!r}; valid: {', '.join(m.value for m in enum)}")
        if self.eps < 0:
            problems.append(f"eps = {self.eps}: must be >= 0")
        if problems:
            raise ValueError("invalid UpdateRule: " + "; ".join(problems))

    def describe(self) -> str:
        """E.g. ``"all_incorrect/union, k=4"``."""
        return f"{self.threshold.value}/{self.group.value}, k={self.k}" + ("" if self.normalize_std else ", mean-only")


def grpo(k: int = 4, **kw) -> UpdateRule:
    """Vanilla GRPO: no prompt is guided."""
    return UpdateRule(k=k, threshold=GuidanceThreshold.NEVER, **kw)


def expected_return(bandit: Bandit, theta: torch.Tensor | None = None) -> torch.Tensor:
    """J(theta) = mean over prompts of the plain policy's success probability. 0-dim."""
    return (bandit.plain_probs(theta) * bandit.rewards).sum(-1).mean()


def unsolved(bandit: Bandit) -> torch.Tensor:
    """The theorem's U: prompts whose greedy (most probable) plain response is wrong (paper Section 2.1:
    unsolved by pass@1). Shape: ``[Q]``, bool."""
    return bandit.rewards.gather(-1, bandit.plain_probs().argmax(-1, keepdim=True)).squeeze(-1) == 0


def return_gradient(bandit: Bandit) -> torch.Tensor:
    """grad J(theta) in closed form: ``mean_q features_q^T (pi_q * (r_q - p_q))``. Shape: ``[D]``."""
    pi = bandit.plain_probs()  # [Q, R]
    p = (pi * bandit.rewards).sum(-1, keepdim=True)  # [Q, 1]
    return torch.einsum("qrd,qr->d", bandit.features, pi * (bandit.rewards - p)) / bandit.num_prompts


def _binomial(n: int, p: torch.Tensor) -> torch.Tensor:
    """P(j successes in n trials) for j = 0..n (0**0 = 1, so p = 0 or 1 is exact). Shape: ``[Q, n+1]``."""
    j = torch.arange(n + 1, dtype=DTYPE)
    comb = torch.tensor([math.comb(n, i) for i in range(n + 1)], dtype=DTYPE)
    p = p.unsqueeze(-1)  # [Q, 1]
    return comb * p.pow(j) * (1 - p).pow(n - j)


def _count_weights(k: int, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P(c), P(c) c / p, P(c) (k - c) / (1 - p))`` for c = 0..k, without dividing by p or 1 - p.

    The last two are ``k Binom(c-1; k-1, p)`` and ``k Binom(c; k-1, p)``. Shape: ``[Q, k+1]`` each.
    """
    prob = _binomial(k, p)  # [Q, k+1]
    fewer = k * _binomial(k - 1, p)  # [Q, k]
    zero = torch.zeros_like(p).unsqueeze(-1)  # [Q, 1]
    return prob, torch.cat([zero, fewer], -1), torch.cat([fewer, zero], -1)


def _advantage_table(size: int, rule: UpdateRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage of a correct and of an incorrect rollout in a group of ``size`` with ``n`` correct.

    Computed with the trainer's :func:`group_advantages` (all ``size + 1`` groups in one call);
    entries for an absent kind are 0. Returns ``(correct, incorrect)``, Shape: ``[size+1]`` each,
    indexed by ``n``.
    """
    n = torch.arange(size + 1)
    rewards = (torch.arange(size).unsqueeze(0) < n.unsqueeze(1)).to(DTYPE)  # [size+1, size]: row n has n ones first
    group = n.unsqueeze(1).expand(size + 1, size)  # [size+1, size]
    adv = group_advantages(rewards.flatten(), group.flatten(), normalize_std=rule.normalize_std, eps=rule.eps).view(size + 1, size)
    pos = torch.where(n > 0, adv[:, 0], torch.zeros((), dtype=DTYPE))
    neg = torch.where(n < size, adv[:, -1], torch.zeros((), dtype=DTYPE))
    return pos, neg


def _fires(rule: UpdateRule) -> torch.Tensor:
    """Whether a prompt with c correct plain rollouts is guided, c = 0..k (the trainer's rule). Shape: ``[k+1]``, bool."""
    k = rule.k
    correct = torch.arange(k).unsqueeze(0) < torch.arange(k + 1).unsqueeze(1)  # [k+1, k]: row c has c correct
    return THRESHOLDS[rule.threshold](correct)


@dataclass(frozen=True)
class Coefficients:
    """Expected update of each prompt as weights on four logit-space directions.

    ``E[g_q] = (plain_pos * m_pos + plain_neg * m_neg + guided_pos * mg_pos + guided_neg * mg_neg) / k``
    with ``m_pos = sum_{y correct} pi(y) (e_y - pi)`` (= grad_logits p_q), ``m_neg = -m_pos``,
    and ``mg_*`` the same sums restricted to responses the hinted policy can sample.
    Each field has shape ``[Q]``.
    """

    plain_pos: torch.Tensor
    """sum_c P(c) (c / p) E[advantage of a correct plain rollout | c]."""
    plain_neg: torch.Tensor
    """sum_c P(c) ((k - c) / (1 - p)) E[advantage of an incorrect plain rollout | c]."""
    guided_pos: torch.Tensor
    """sum_{c guided} P(c) sum_c~ P(c~) (c~ / p~) A(correct guided | c, c~)."""
    guided_neg: torch.Tensor
    """sum_{c guided} P(c) sum_c~ P(c~) ((k - c~) / (1 - p~)) A(incorrect guided | c, c~)."""
    fire_prob: torch.Tensor
    """P(the prompt is guided). Shape: ``[Q]``."""
    guided_advantage: torch.Tensor
    """E[mean advantage of the k guided rollouts | guided]: the theorem's A~_q (NaN when never guided)."""


def update_coefficients(bandit: Bandit, rule: UpdateRule) -> Coefficients:
    """The double binomial sums over the plain count c ~ Bin(k, p) and the guided count c~ ~ Bin(k, p~).

    Given c, a correct plain rollout is a draw from pi restricted to the correct responses, so its
    expected ``A grad log pi`` is ``A m_pos / p``; a guided one from pi(.|x~) restricted likewise,
    and its importance weight pi/pi(.|x~) turns the expectation into ``A mg_pos / p~``. The
    divisions are folded into the binomial weights (:func:`_count_weights`), so p, p~ = 0 or 1 are exact.
    """
    k = rule.k
    pi, sigma, r = bandit.plain_probs(), bandit.hinted_probs(), bandit.rewards
    p, pt = (pi * r).sum(-1), (sigma * r).sum(-1)  # [Q]
    prob, w_pos, w_neg = _count_weights(k, p)  # [Q, k+1]: over c
    gprob, gw_pos, gw_neg = _count_weights(k, pt)  # [Q, k+1]: over c~
    fire = _fires(rule).to(DTYPE)  # [k+1]
    keep = 1 - fire
    small_pos, small_neg = _advantage_table(k, rule)  # [k+1]: a group of k plain rollouts
    if rule.group is GuidedGroupMode.UNION:
        big_pos, big_neg = _advantage_table(2 * k, rule)  # [2k+1]
        total = torch.arange(k + 1).unsqueeze(1) + torch.arange(k + 1).unsqueeze(0)  # [k+1, k+1]: c + c~
        plain_in_guided_pos, plain_in_guided_neg = big_pos[total], big_neg[total]  # [c, c~]
        guided_pos_adv, guided_neg_adv = big_pos[total], big_neg[total]  # [c, c~]
    else:
        zeros = torch.zeros(k + 1, k + 1, dtype=DTYPE)
        plain_in_guided_pos, plain_in_guided_neg = zeros, zeros  # the failed group is dropped
        guided_pos_adv, guided_neg_adv = small_pos.expand(k + 1, k + 1), small_neg.expand(k + 1, k + 1)  # [c, c~]: own group
    # Plain rollouts: their own group when not guided, the guided group's values when guided.
    plain_pos = (w_pos * (keep * small_pos + fire * torch.einsum("qj,cj->qc", gprob, plain_in_guided_pos))).sum(-1)
    plain_neg = (w_neg * (keep * small_neg + fire * torch.einsum("qj,cj->qc", gprob, plain_in_guided_neg))).sum(-1)
    guided_pos = torch.einsum("qc,c,qj,cj->q", prob, fire, gw_pos, guided_pos_adv)
    guided_neg = torch.einsum("qc,c,qj,cj->q", prob, fire, gw_neg, guided_neg_adv)
    fire_prob = (prob * fire).sum(-1)  # [Q]
    c_tilde = torch.arange(k + 1, dtype=DTYPE)
    mean_adv = (c_tilde * guided_pos_adv + (k - c_tilde) * guided_neg_adv) / k  # [c, c~]
    joint = torch.einsum("qc,c,qj,cj->q", prob, fire, gprob, mean_adv)
    guided_advantage = torch.where(fire_prob > 0, joint / fire_prob.clamp(min=1e-300), torch.full_like(joint, float("nan")))
    return Coefficients(plain_pos, plain_neg, guided_pos, guided_neg, fire_prob, guided_advantage)


def expected_logit_update(bandit: Bandit, rule: UpdateRule) -> torch.Tensor:
    """E[d objective_q / d logits_q] at theta_old for each prompt's own surrogate (Eq. 6 over S(q) / k).

    Returns:
        Shape: ``[Q, R]``.
    """
    coef = update_coefficients(bandit, rule)
    pi, sigma, r = bandit.plain_probs(), bandit.hinted_probs(), bandit.rewards
    score = torch.eye(pi.shape[-1], dtype=DTYPE) - pi.unsqueeze(1)  # [Q, R(y), R]: e_y - pi
    reachable = (sigma > 0).to(DTYPE)  # [Q, R]: importance sampling only sees what the hint can sample

    def direction(weight):  # sum_y weight(y) (e_y - pi), [Q, R]
        return (weight.unsqueeze(-1) * score).sum(1)

    m_pos, m_neg = direction(pi * r), direction(pi * (1 - r))
    mg_pos, mg_neg = direction(pi * r * reachable), direction(pi * (1 - r) * reachable)
    total = (
        coef.plain_pos.unsqueeze(-1) * m_pos
        + coef.plain_neg.unsqueeze(-1) * m_neg
        + coef.guided_pos.unsqueeze(-1) * mg_pos
        + coef.guided_neg.unsqueeze(-1) * mg_neg
    )
    return total / rule.k


def expected_update(bandit: Bandit, rule: UpdateRule) -> torch.Tensor:
    """E[g]: the expected gradient of the Guide objective (Eq. 6, mean over the Q prompts) at theta_old. Shape: ``[D]``."""
    return torch.einsum("qrd,qr->d", bandit.features, expected_logit_update(bandit, rule)) / bandit.num_prompts


def assumption_value(bandit: Bandit, rule: UpdateRule) -> torch.Tensor:
    """The theorem's E_{q in U} E[A~_q]: the guided rollouts' mean advantage, over the (prompt, step)
    pairs where the prompt is guided (weights P(guided)). NaN when no prompt can be guided. 0-dim."""
    coef = update_coefficients(bandit, rule)
    fired = coef.fire_prob > 0
    if not fired.any():
        return torch.tensor(float("nan"), dtype=DTYPE)
    weights = coef.fire_prob[fired]
    return (weights * coef.guided_advantage[fired]).sum() / weights.sum()


def improvement(bandit: Bandit, direction: torch.Tensor, eta: float) -> torch.Tensor:
    """J(theta + eta * direction) - J(theta). 0-dim."""
    return expected_return(bandit, bandit.theta + eta * direction) - expected_return(bandit)


def monte_carlo_update(bandit: Bandit, rule: UpdateRule, batches: int, generator: torch.Generator) -> torch.Tensor:
    """Mean over ``batches`` sampled steps of the update the trainer computes: sampled rollouts,
    :func:`select_for_guidance`'s rule, :func:`group_advantages`, and minus the gradient of
    :func:`guide_policy_loss` (``aggregation="paper"``, no clipping on guided rollouts) at theta_old.

    Returns:
        Shape: ``[D]``; tends to :func:`expected_update` as ``batches`` grows.
    """
    q, k = bandit.num_prompts, rule.k
    pi, sigma = bandit.plain_probs(), bandit.hinted_probs()
    n = batches * q  # independent (batch, prompt) draws, batch-major
    prompt = torch.arange(q).repeat(batches)  # [n]
    plain = torch.multinomial(pi[prompt], k, replacement=True, generator=generator)  # [n, k]
    hinted = torch.multinomial(sigma[prompt], k, replacement=True, generator=generator)  # [n, k]
    plain_r, hinted_r = bandit.rewards[prompt.unsqueeze(-1), plain], bandit.rewards[prompt.unsqueeze(-1), hinted]  # [n, k]
    fire = THRESHOLDS[rule.threshold](plain_r.bool())  # [n]
    ids = torch.arange(n).unsqueeze(-1).expand(n, k)  # [n, k]: one group per (batch, prompt)
    fire_k = fire.unsqueeze(-1).expand(n, k)  # [n, k]
    plain_group = ids if rule.group is GuidedGroupMode.UNION else torch.where(fire_k, -1, ids)
    hinted_group = torch.where(fire_k, ids, -1)
    group = torch.cat([plain_group.flatten(), hinted_group.flatten()])  # [2*n*k]
    rewards = torch.cat([plain_r.flatten(), hinted_r.flatten()])  # [2*n*k]
    adv = group_advantages(rewards, group, normalize_std=rule.normalize_std, eps=rule.eps)  # [2*n*k]

    theta = bandit.theta.clone().requires_grad_(True)
    logp = bandit.plain_logits(theta).log_softmax(-1)  # [Q, R]
    rows_prompt = prompt.unsqueeze(-1).expand(n, k).flatten().repeat(2)  # [2*n*k]
    response = torch.cat([plain.flatten(), hinted.flatten()])  # [2*n*k]
    guided = torch.cat([torch.zeros(n * k, dtype=torch.bool), torch.ones(n * k, dtype=torch.bool)])  # [2*n*k]
    old = torch.where(guided, sigma.log()[rows_prompt, response], pi.log()[rows_prompt, response])  # [2*n*k]
    loss, _ = guide_policy_loss(
        logp[rows_prompt, response].unsqueeze(-1),  # [2*n*k, 1]
        old.unsqueeze(-1),
        adv,
        (group >= 0).unsqueeze(-1),  # [2*n*k, 1]
        guided,
        clip_guided=False,
        aggregation=Aggregation.PAPER,
        num_prompts=n,
        group_size=k,
    )
    (grad,) = torch.autograd.grad(-loss, theta)
    return grad


# ---------------------------------------------------------------------------------------------
# The cases of the table and the figure.


@dataclass(frozen=True)
class Case:
    """One bandit, the Guide rule checked on it, and what the case shows."""

    name: str
    bandit: Bandit
    guide: UpdateRule
    shows: str
    etas: tuple[float, ...] = field(default=(0.01, 0.1, 0.3, 1.0, 3.0))

    @property
    def baseline(self) -> UpdateRule:
        """Vanilla GRPO with the same k and advantage normalisation."""
        return grpo(self.guide.k, normalize_std=self.guide.normalize_std, eps=self.guide.eps)


def _hard_prompts(hint: float) -> Bandit:
    """Three prompts, four responses, response 0 correct; plain success rates about 0.03, 0.10, 0.30."""
    logits = torch.tensor([[-2.2, 0.5, 0.0, -0.5], [-1.1, 0.5, 0.0, -0.5], [0.2, 0.5, 0.0, -0.5]])
    rewards = torch.tensor([[1.0, 0, 0, 0]] * 3)
    bias = torch.zeros(3, 4)
    bias[:, 0] = hint
    return tabular(logits, bias, rewards)


def _interference() -> Bandit:
    """Two unsolved prompts, two responses (correct first), one parameter shared by both: the correct
    answer's logit is ``theta - 3`` for prompt 0 and ``-0.3 theta - 0.5`` for prompt 1, so theta helps
    prompt 0 and hurts prompt 1. Prompt 0 is hard (p ~ 0.05, guided in ~82% of steps), prompt 1 less so
    (p ~ 0.38, guided in ~15%) and more sensitive to theta (|d p_1 / d theta| ~ 0.070 > 0.045)."""
    features = torch.tensor([[[1.0], [0.0]], [[-0.3], [0.0]]])  # [Q=2, R=2, D=1]
    offset = torch.tensor([[-3.0, 0.0], [-0.5, 0.0]])
    bias = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    return Bandit(features, offset, bias, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.zeros(1))


def cases(k: int = 4) -> list[Case]:
    """The cases of ``python -m nemo_guide.theory`` (and docs/theorem1.png)."""
    paper = UpdateRule(k=k)
    return [
        Case("helpful hint", _hard_prompts(3.0), paper, "hint raises p~: assumption holds, Guide > GRPO"),
        Case("misleading hint", _hard_prompts(-2.0), paper, "hint lowers p~ six- to seven-fold: assumption still holds (union group), Guide > GRPO by almost as much"),
        Case("hint never correct", _hard_prompts(float("-inf")), paper, "p~ = 0, A~ = 0: assumption fails, Guide = GRPO exactly (no strict gain)"),
        Case("replace group", _hard_prompts(3.0), UpdateRule(k=k, group=GuidedGroupMode.REPLACE), "authors' group layout: A~ = 0 by construction, assumption fails, yet Guide > GRPO"),
        Case("shared parameter", _interference(), paper, "one parameter helps one unsolved prompt and hurts the other: assumption holds, Guide's first-order change is negative, GRPO's positive"),
        Case(
            "always, misleading hint",
            _hard_prompts(-2.0),
            UpdateRule(k=k, threshold=GuidanceThreshold.ALWAYS),
            "threshold 'always' (Table 3), hint lowers p~: A~ < 0, assumption fails, yet Guide > GRPO",
        ),
        Case(
            "always, replace, mild hint",
            _hard_prompts(1.0),
            UpdateRule(k=k, threshold=GuidanceThreshold.ALWAYS, group=GuidedGroupMode.REPLACE),
            "A~ = 0, assumption fails, and Guide < GRPO",
        ),
    ]


def evaluate(case: Case) -> list[dict]:
    """One row per step size: improvements and first-order terms of GRPO and Guide, and the assumption."""
    g_grpo, g_guide = expected_update(case.bandit, case.baseline), expected_update(case.bandit, case.guide)
    grad = return_gradient(case.bandit)
    slope_grpo, slope_guide = float(grad @ g_grpo), float(grad @ g_guide)
    assumption = float(assumption_value(case.bandit, case.guide))
    rows = []
    for eta in case.etas:
        rows.append(
            {
                "case": case.name,
                "rule": case.guide.describe(),
                "unsolved": f"{int(unsolved(case.bandit).sum())}/{case.bandit.num_prompts}",
                "eta": eta,
                "dJ_grpo": float(improvement(case.bandit, g_grpo, eta)),
                "dJ_guide": float(improvement(case.bandit, g_guide, eta)),
                "first_grpo": eta * slope_grpo,
                "first_guide": eta * slope_guide,
                "assumption": assumption,
                "holds": assumption > ASSUMPTION_TOL,
            }
        )
    return rows


def _signed(value: float) -> str:
    """``+0.591``, ``-0.135``, or ``0`` within :data:`ASSUMPTION_TOL` (rounding of an exact 0)."""
    return "0" if abs(value) <= ASSUMPTION_TOL else f"{value:+.3f}"


def compare(guide: float, grpo: float, rel: float = 1e-9) -> str:
    """``"yes"`` if ``guide > grpo``, ``"equal"`` within ``rel`` of their scale, else ``"no"``."""
    scale = max(abs(guide), abs(grpo), 1e-300)
    if abs(guide - grpo) <= rel * scale:
        return "equal"
    return "yes" if guide > grpo else "no"


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`evaluate` rows."""
    head = "| case | Guide rule | U | eta | dJ GRPO | dJ Guide | eta<gradJ,g> GRPO | eta<gradJ,g> Guide | E[A~] | assumption | Guide > GRPO (1st order) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        verdict = compare(row["first_guide"], row["first_grpo"])
        lines.append(
            f"| {row['case']} | {row['rule']} | {row['unsolved']} | {row['eta']:g} | {row['dJ_grpo']:.3e} | {row['dJ_guide']:.3e} | {row['first_grpo']:.3e} | "
            f"{row['first_guide']:.3e} | {_signed(row['assumption'])} | {'holds' if row['holds'] else 'fails'} | {verdict} |"
        )
    return "\n".join(lines)


def plot(case_rows: dict[str, dict], out: Path, etas: torch.Tensor) -> Path:
    """Improvement per unit step, (J(theta + eta E[g]) - J(theta)) / eta, vs eta for GRPO and Guide, one
    panel per case; the first-order terms <grad J, E[g]> are the dashed levels the curves reach as eta -> 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(case_rows)
    cols, rows = 3, (len(names) + 2) // 3
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.7 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        case = case_rows[name]
        for label, color, curve, slope in (
            ("GRPO", "tab:blue", case["dJ_grpo"], case["slope_grpo"]),
            ("Guide", "tab:orange", case["dJ_guide"], case["slope_guide"]),
        ):
            ax.plot(etas, curve / etas, "-", color=color, label=f"{label}: (J(theta + eta E[g]) - J) / eta")
            ax.axhline(slope, color=color, ls="--", alpha=0.7, label=f"{label}: first order <grad J, E[g]>")
        ax.set_xscale("log")
        verdict = "holds" if case["assumption"] > ASSUMPTION_TOL else "fails"
        ax.set_title(f"{name} ({case['rule']})\nE[A~] = {_signed(case['assumption'])}: assumption {verdict}", fontsize=9)
        ax.set_xlabel("step size eta")
        ax.set_ylabel("improvement of J / eta")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Theorem 1 on a softmax bandit: exact expected updates, GRPO vs Guide-GRPO")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_guide.theory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the figure (improvement vs eta per case) to this PNG")
    parser.add_argument("--k", type=int, default=4, help="rollouts per prompt (default 4)")
    parser.add_argument("--eta", type=float, nargs="+", help="step sizes of the table (default 0.01 0.1 0.3 1 3)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k {args.k}: give a whole number >= 1")
    all_cases = cases(args.k)
    if args.eta:
        all_cases = [Case(c.name, c.bandit, c.guide, c.shows, tuple(args.eta)) for c in all_cases]
    rows = [row for case in all_cases for row in evaluate(case)]
    print(format_table(rows))
    print()
    for case in all_cases:
        print(f"- {case.name}: {case.shows}")
    if args.out:
        etas = torch.logspace(-3, 1, 60, dtype=DTYPE)
        curves = {}
        for case in all_cases:
            g = {"grpo": expected_update(case.bandit, case.baseline), "guide": expected_update(case.bandit, case.guide)}
            grad = return_gradient(case.bandit)
            curves[case.name] = {
                "dJ_grpo": torch.stack([improvement(case.bandit, g["grpo"], float(e)) for e in etas]),
                "dJ_guide": torch.stack([improvement(case.bandit, g["guide"], float(e)) for e in etas]),
                "slope_grpo": float(grad @ g["grpo"]),
                "slope_guide": float(grad @ g["guide"]),
                "assumption": float(assumption_value(case.bandit, case.guide)),
                "rule": case.guide.describe(),
            }
        print(f"\nwrote {plot(curves, args.out, etas)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__: list[str] = [
    "Bandit",
    "Case",
    "Coefficients",
    "UpdateRule",
    "assumption_value",
    "cases",
    "evaluate",
    "expected_logit_update",
    "expected_return",
    "expected_update",
    "grpo",
    "improvement",
    "monte_carlo_update",
    "return_gradient",
    "tabular",
    "unsolved",
    "update_coefficients",
]
