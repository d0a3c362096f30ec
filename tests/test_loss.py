import math

import pytest
import torch

from nemo_guide.core.loss import aggregate, guide_policy_loss, masked_quantile, shape_ratios

T, F = True, False


def _lp(ratios):
    """logprobs/old_logprobs pair whose ratio is ``ratios`` (old = log 0.5)."""
    ratios = torch.tensor(ratios, dtype=torch.float64)
    old = torch.full_like(ratios, math.log(0.5))
    return (old + ratios.log()).requires_grad_(True), old


def test_hand_computed_plain_clip_and_guided_unclipped():
    # row 0 plain, A=+1, w=[1.5, 0.5]: -min(1.5, 1.2) = -1.2 (clipped); -min(0.5, 0.8) = -0.5
    # row 1 guided, A=-1, w=[0.1, 2.0], unclipped: -w*A = 0.1, 2.0
    # token-mean: (-1.2 - 0.5 + 0.1 + 2.0) / 4 = 0.1
    logprobs, old = _lp([[1.5, 0.5], [0.1, 2.0]])
    loss, m = guide_policy_loss(logprobs, old, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool), torch.tensor([F, T]))
    assert loss.item() == pytest.approx(0.1)
    assert m["plain/clip_frac"].item() == pytest.approx(0.5)
    assert m["guided/clip_frac"].item() == 0.0
    assert m["plain/token_frac"].item() == pytest.approx(0.5)
    assert m["guided/ratio_min"].item() == pytest.approx(0.1)
    assert m["guided/ratio_max"].item() == pytest.approx(2.0)
    assert m["plain/ratio_mean"].item() == pytest.approx(1.0)


def test_hand_computed_clip_guided():
    # guided row now clipped like plain: w=0.1, A=-1: -min(-0.1, -0.8) = 0.8; w=2, A=-1: -min(-2, -1.2) = 2.0
    # token-mean: (-1.2 - 0.5 + 0.8 + 2.0) / 4 = 0.275
    logprobs, old = _lp([[1.5, 0.5], [0.1, 2.0]])
    loss, m = guide_policy_loss(logprobs, old, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool), torch.tensor([F, T]), clip_guided=True)
    assert loss.item() == pytest.approx(0.275)
    assert m["guided/clip_frac"].item() == pytest.approx(0.5)  # only w=0.1 takes the clipped branch


def test_asymmetric_clip_range():
    # w = 1.25, A = +1: clip_high=0.28 -> not clipped (-1.25); clip_high=0.2 -> -1.2
    logprobs, old = _lp([[1.25]])
    args = (logprobs, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), torch.tensor([F]))
    assert guide_policy_loss(*args, clip_high=0.28)[0].item() == pytest.approx(-1.25)
    assert guide_policy_loss(*args, clip_high=0.2)[0].item() == pytest.approx(-1.2)
    # w = 0.7, A = -1: clip_low=0.2 -> -min(-0.7, -0.8) = 0.8
    logprobs, old = _lp([[0.7]])
    assert guide_policy_loss(logprobs, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), torch.tensor([F]), clip_low=0.2)[0].item() == pytest.approx(0.8)


def test_hand_computed_aggregations():
    # ratio 1 everywhere, so token loss = -A; rows of 1, 2 and 3 tokens with A = 1, 2, 3
    logprobs = torch.zeros(3, 3, requires_grad=True)
    mask = torch.tensor([[T, F, F], [T, T, F], [T, T, T]])
    adv = torch.tensor([1.0, 2.0, 3.0])
    guided = torch.tensor([F, F, T])

    def run(agg, **kw):
        return guide_policy_loss(logprobs, torch.zeros(3, 3), adv, mask, guided, aggregation=agg, **kw)[0].item()

    assert run("token-mean") == pytest.approx(-14 / 6)  # -(1 + 4 + 9) / 6 tokens
    assert run("seq-mean-token-mean") == pytest.approx(-2.0)  # mean(-1, -2, -3)
    assert run("seq-mean-token-sum") == pytest.approx(-14 / 3)  # mean(-1, -4, -9)
    # paper: sum of token-means over num_prompts * group_size = (-1 - 2 - 3) / (1 * 2)
    assert run("paper", num_prompts=1, group_size=2) == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="num_prompts"):
        run("paper")


def test_seq_mean_ignores_rows_without_tokens():
    values = torch.tensor([[2.0, 4.0], [9.0, 9.0]])
    mask = torch.tensor([[T, T], [F, F]])
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_percentile_shaping_batch_hand_computed():
    # guided ratios 0.1, 0.2, 0.3, 0.4, 0.5 -> 0.9 quantile (linear) = 0.46
    ratio = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    guided_mask = torch.tensor([[T] * 5, [F] * 5])
    shaped, gamma = shape_ratios(ratio, guided_mask, "percentile", 0.9, "batch")
    assert gamma[0].item() == pytest.approx(0.46)
    torch.testing.assert_close(shaped[0], ratio[0] / (ratio[0] + 0.46))
    torch.testing.assert_close(shaped[1], ratio[1])  # plain rows untouched


def test_constant_shaping_and_gamma_clamp():
    ratio = torch.tensor([[1e-9, 1e-9]])
    shaped, gamma = shape_ratios(ratio, torch.tensor([[T, T]]), "percentile", 0.9, "batch")
    assert gamma.item() == pytest.approx(1e-4)  # clamped from 1e-9
    shaped, gamma = shape_ratios(torch.tensor([[1.0]]), torch.tensor([[T]]), "constant", 0.1)
    assert shaped.item() == pytest.approx(1 / 1.1)


@pytest.mark.parametrize("seed", range(5))
def test_masked_quantile_matches_torch_quantile(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.4
    mask[0] = False
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        per_row = masked_quantile(values, mask, q, per_row=True)
        for i in range(6):
            if mask[i].any():
                assert per_row[i].item() == pytest.approx(torch.quantile(values[i][mask[i]], q).item())
            else:
                assert math.isnan(per_row[i].item())
        assert masked_quantile(values, mask, q, per_row=False).item() == pytest.approx(torch.quantile(values[mask], q).item())


def _loop_reference(logprobs, old, adv, mask, guided, clip_low, clip_high, clip_guided, shaping, gamma_q, scope, aggregation, num_prompts, group_size):
    """Token-by-token reference of the contract in DESIGN section 4."""
    n, length = logprobs.shape
    w = [[math.exp(logprobs[i, t].item() - old[i, t].item()) for t in range(length)] for i in range(n)]
    gammas = [None] * n
    if shaping == "percentile":
        if scope == "batch":
            sel = [w[i][t] for i in range(n) for t in range(length) if guided[i] and mask[i, t]]
            gb = max(torch.quantile(torch.tensor(sel, dtype=torch.float64), gamma_q).item(), 1e-4) if sel else 1.0
            gammas = [gb] * n
        else:
            for i in range(n):
                sel = [w[i][t] for t in range(length) if mask[i, t]]
                gammas[i] = max(torch.quantile(torch.tensor(sel, dtype=torch.float64), gamma_q).item(), 1e-4) if sel else 1.0
    elif shaping == "constant":
        gammas = [gamma_q] * n
    rows = []
    for i in range(n):
        row = []
        for t in range(length):
            if not mask[i, t]:
                continue
            a = adv[i].item()
            s = w[i][t]
            if guided[i] and shaping != "none":
                s = s / (s + gammas[i])
            if guided[i] and not clip_guided:
                row.append(-s * a)
            else:
                row.append(max(-s * a, -min(max(s, 1 - clip_low), 1 + clip_high) * a))
        rows.append(row)
    if aggregation == "token-mean":
        toks = [x for r in rows for x in r]
        return sum(toks) / max(len(toks), 1)
    if aggregation == "seq-mean-token-mean":
        per = [sum(r) / len(r) for r in rows if r]
        return sum(per) / max(len(per), 1)
    if aggregation == "seq-mean-token-sum":
        per = [sum(r) for r in rows if r]
        return sum(per) / max(len(per), 1)
    return sum(sum(r) / len(r) for r in rows if r) / (num_prompts * group_size)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shaping,scope", [("none", "batch"), ("percentile", "batch"), ("percentile", "rollout"), ("constant", "batch")])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "paper"])
def test_vectorised_matches_loop_reference(seed, shaping, scope, aggregation):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    length = int(torch.randint(1, 7, (1,), generator=g))
    logprobs = -torch.rand(n, length, generator=g, dtype=torch.float64) * 3
    old = logprobs + torch.randn(n, length, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, length, generator=g) > 0.3
    guided = torch.rand(n, generator=g) > 0.5
    clip_guided = bool(seed % 2)
    gamma_q = 0.9 if shaping != "constant" else 0.3
    kw = dict(clip_low=0.2, clip_high=0.28, clip_guided=clip_guided, shaping=shaping, shaping_gamma=gamma_q, shaping_scope=scope, aggregation=aggregation, num_prompts=3, group_size=2)
    got, _ = guide_policy_loss(logprobs, old, adv, mask, guided, **kw)
    want = _loop_reference(logprobs, old, adv, mask, guided, 0.2, 0.28, clip_guided, shaping, gamma_q, scope, aggregation, 3, 2)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_zero_advantage_gives_zero_gradient():
    logprobs = torch.randn(4, 5, requires_grad=True)
    loss, _ = guide_policy_loss(logprobs, torch.randn(4, 5), torch.zeros(4), torch.ones(4, 5, dtype=torch.bool), torch.tensor([F, T, F, T]))
    loss.backward()
    assert torch.count_nonzero(logprobs.grad) == 0


def test_tiny_guided_ratio_with_negative_advantage_still_gets_gradient():
    # w = 1e-3 < 1 - eps and A < 0: the PPO clip takes the flat branch (no gradient);
    # unclipped guided tokens keep the gradient -A * w.
    logprobs, old = _lp([[1e-3]])
    adv, mask, guided = torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), torch.tensor([T])
    loss, _ = guide_policy_loss(logprobs, old, adv, mask, guided)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert grad.item() == pytest.approx(1e-3)  # d(-A w)/dlogp = -A * w
    loss, _ = guide_policy_loss(logprobs, old, adv, mask, guided, clip_guided=True)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert grad.item() == 0.0


def test_on_policy_gradient_is_minus_advantage():
    # at w = 1 (logprobs == old), d loss / d logp_t = -A_t / num_tokens for token-mean
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    loss, _ = guide_policy_loss(logprobs, logprobs.detach().clone(), torch.tensor([2.0, -1.0]), torch.ones(2, 3, dtype=torch.bool), torch.tensor([F, T]))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2 / 6] * 3, [1 / 6] * 3]))


def test_direction_higher_advantage_lower_loss():
    logprobs = torch.randn(3, 4)
    old = logprobs + 0.05 * torch.randn(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    losses = [guide_policy_loss(logprobs, old, torch.full((3,), a), mask, torch.tensor([F, T, F]))[0].item() for a in (-1.0, 0.0, 1.0, 2.0)]
    assert losses == sorted(losses, reverse=True)


def test_no_valid_token_gives_attached_zero():
    logprobs = torch.randn(2, 3, requires_grad=True)
    loss, m = guide_policy_loss(logprobs, torch.randn(2, 3), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool), torch.tensor([F, T]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(logprobs.grad) == 0
    assert math.isnan(m["guided/ratio_mean"].item()) and m["guided/clip_frac"].item() == 0.0


def test_garbage_in_masked_positions_does_not_leak():
    logprobs = torch.tensor([[-1.0, float("-inf")], [-0.5, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("nan")], [-0.1, float("inf")]])
    mask = torch.tensor([[T, F], [T, F]])
    loss, m = guide_policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask, torch.tensor([F, T]), ref_logprobs=torch.tensor([[-1.1, float("nan")], [-0.4, float("nan")]]), kl_coef=0.1, entropy=torch.tensor([[0.3, float("inf")], [0.2, float("inf")]]), entropy_coef=0.01)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v) for k, v in m.items() if not k.startswith("guided/ratio_p"))


def test_guided_ratio_diagnostics():
    # guided ratios: 1e-9, 1e-4, 0.5, 1.0 -> 2 of 4 below 1e-3
    logprobs, old = _lp([[1e-9, 1e-4, 0.5, 1.0]])
    _, m = guide_policy_loss(logprobs, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 4, dtype=torch.bool), torch.tensor([T]))
    assert m["guided/frac_ratio_below_1e-3"].item() == pytest.approx(0.5)
    assert m["guided/ratio_p50"].item() == pytest.approx((1e-4 + 0.5) / 2)
    assert m["guided/ratio_min"].item() == pytest.approx(1e-9, rel=1e-6)
    assert all(not v.requires_grad for v in m.values())


def test_kl_and_entropy_terms():
    from nemo_guide.core.kl import kl_penalty

    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    # k3 with log r = ref - lp = -0.5 (first token): exp(-0.5) + 0.5 - 1
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([[math.exp(-0.5) + 0.5 - 1, 0.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([[0.125, 0.0]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    base, _ = guide_policy_loss(lp, lp, torch.zeros(1), mask, torch.tensor([F]))
    with_kl, m = guide_policy_loss(lp, lp, torch.zeros(1), mask, torch.tensor([F]), ref_logprobs=ref, kl_coef=0.5, kl_estimator="k1")
    assert with_kl.item() == pytest.approx(base.item() + 0.5 * 0.25)  # token-mean of k1 = (0.5 + 0) / 2
    ent = torch.tensor([[2.0, 4.0]])
    with_ent, m = guide_policy_loss(lp, lp, torch.zeros(1), mask, torch.tensor([F]), entropy=ent, entropy_coef=0.1)
    assert with_ent.item() == pytest.approx(-0.1 * 3.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        guide_policy_loss(lp, lp, torch.zeros(1), mask, torch.tensor([F]), kl_coef=0.1)


def test_shape_validation():
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        guide_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool), torch.tensor([F, F]))
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'; valid: 'token-mean'"):
        guide_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1, dtype=torch.bool), torch.tensor([F]), aggregation="mean")
