"""The exact expected GRPO and Guide-GRPO updates of a softmax bandit (see :mod:`nemo_guide.theory`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nemo_guide.core.advantages import group_advantages
from nemo_guide.core.guidance import THRESHOLDS, GuidanceThreshold, GuidedGroupMode

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
