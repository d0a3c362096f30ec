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

from nemo_guide.theory.exact import (
    ASSUMPTION_TOL,
    Bandit,
    Coefficients,
    UpdateRule,
    assumption_value,
    expected_logit_update,
    expected_return,
    expected_update,
    grpo,
    improvement,
    return_gradient,
    tabular,
    unsolved,
    update_coefficients,
)
from nemo_guide.theory.report import Case, cases, evaluate, format_table, main
from nemo_guide.theory.sampled import monte_carlo_update

__all__ = [
    "ASSUMPTION_TOL",
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
    "format_table",
    "grpo",
    "improvement",
    "main",
    "monte_carlo_update",
    "return_gradient",
    "tabular",
    "unsolved",
    "update_coefficients",
]
