import math

import pytest
import torch

from nemo_guide.core.advantages import equal_reward_groups, group_advantages


def test_hand_computed_union_group():
    # group 0: 4 failed plain + 4 guided with 2 correct: rewards [0,0,0,0,1,1,0,0]
    # mean = 2/8 = 0.25; unbiased var = (2*0.75^2 + 6*0.25^2)/7 = (1.125+0.375)/7 = 1.5/7
    rewards = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0.0])
    group = torch.zeros(8, dtype=torch.long)
    std = math.sqrt(1.5 / 7)
    adv = group_advantages(rewards, group, eps=0.0)
    expected = torch.tensor([-0.25 / std] * 4 + [0.75 / std] * 2 + [-0.25 / std] * 2)
    torch.testing.assert_close(adv, expected)


def test_mean_only_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0])
    group = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(rewards, group, normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -1.5, 1.5]))


def test_equal_groups_get_exact_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 0.7])
    group = torch.tensor([0, 0, 0, 1, 1, 2])  # group 2 has one member
    adv = group_advantages(rewards, group)
    assert adv.tolist() == [0.0] * 6
    assert equal_reward_groups(rewards, group).tolist() == [True] * 6


def test_negative_group_ids_are_excluded():
    rewards = torch.tensor([1.0, 0.0, 5.0, 7.0])
    group = torch.tensor([0, 0, -1, -1])
    adv = group_advantages(rewards, group, eps=0.0)
    s = math.sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0]))
    assert equal_reward_groups(rewards, group).tolist() == [False, False, True, True]


def _loop_reference(rewards, group, normalize_std, eps):
    out = torch.zeros_like(rewards)
    for g in set(group.tolist()):
        if g < 0:
            continue
        idx = [i for i, x in enumerate(group.tolist()) if x == g]
        r = rewards[idx]
        if len(idx) == 1 or bool((r == r[0]).all()):
            continue
        a = r - r.mean()
        if normalize_std:
            a = a / (r.std(unbiased=True) + eps)
        out[idx] = a
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("normalize_std", [True, False])
def test_vectorised_matches_loop_reference(seed, normalize_std):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 60, (1,), generator=g))
    rewards = torch.randint(0, 3, (n,), generator=g).float() / 2
    group = torch.randint(-1, 7, (n,), generator=g) * 3  # sparse, unsorted ids with -3 meaning none
    group = torch.where(group < 0, torch.full_like(group, -1), group)
    got = group_advantages(rewards, group, normalize_std=normalize_std)
    torch.testing.assert_close(got, _loop_reference(rewards, group, normalize_std, 1e-6))


def test_group_mean_is_zero_property():
    torch.manual_seed(1)
    rewards = torch.rand(40)
    group = torch.arange(40) % 5
    adv = group_advantages(rewards, group, normalize_std=False)
    for g in range(5):
        assert abs(float(adv[group == g].sum())) < 1e-5


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[N\]"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
