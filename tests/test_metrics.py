from fractions import Fraction

import pytest

from nemo_guide.core.metrics import absolute_k, decompose_progress, decompose_progress_expected, pass_at_k, pass_at_k_curve


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k: every draw of 3 holds a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n


def _product_form(n, c, k):
    p = Fraction(1)
    for i in range(n - c + 1, n + 1):
        p *= 1 - Fraction(k, i)
    return float(1 - p)


@pytest.mark.parametrize("n,c,k", [(5000, 10, 100), (4000, 1, 2000), (3000, 2999, 1), (2048, 7, 16), (100, 50, 64)])
def test_pass_at_k_exact_for_large_n(n, c, k):
    # math.comb(n, k) overflows a float here; the exact product form agrees
    assert pass_at_k(n, c, k) == _product_form(n, c, k)


def test_pass_at_k_monotone():
    assert [pass_at_k(64, 3, k) for k in range(1, 65)] == sorted(pass_at_k(64, 3, k) for k in range(1, 65))
    assert [pass_at_k(64, c, 8) for c in range(65)] == sorted(pass_at_k(64, c, 8) for c in range(65))


@pytest.mark.parametrize("args", [(0, 0, 1), (5, 6, 1), (5, 1, 0), (5, 1, 6), (5.0, 1, 1), (True, 1, 1)])
def test_pass_at_k_rejects_bad_input(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_decompose_progress_fixture():
    # 8 problems:      0  1  2  3  4  5  6  7
    init_pass1 = [0, 0, 0, 0, 1, 1, 1, 0]
    init_passk = [1, 1, 0, 0, 1, 1, 1, 0]
    final_pass1 = [1, 0, 1, 0, 1, 0, 1, 1]
    # progress: unsolved at init and solved after: 0, 2, 7 -> 3
    # distillation (with init pass@k): 0 -> 1; capability gain: 2, 7 -> 2
    # regression: solved at init, unsolved after: 5 -> 1; net = 3 - 1 = 2
    d = decompose_progress(init_pass1, init_passk, final_pass1)
    assert d == {"problems": 8, "unsolved_init": 5, "progress": 3, "distillation": 1, "capability_gain": 2, "regression": 1, "net": 2}
    # net equals the change in pass@1 accuracy count
    assert d["net"] == sum(final_pass1) - sum(init_pass1)


def test_decompose_progress_accepts_tensors_and_checks_lengths():
    import torch

    d = decompose_progress(torch.tensor([False, True]), torch.tensor([True, True]), torch.tensor([True, True]))
    assert d["distillation"] == 1
    with pytest.raises(ValueError, match="one entry per problem"):
        decompose_progress([0, 1], [0], [1, 1])
    with pytest.raises(ValueError, match="not a boolean"):
        decompose_progress([0, 2], [0, 1], [1, 1])


def test_decompose_expected():
    # problem 0: unsolved at init, solved after, 1 of 4 initial samples correct -> pass@2 = 1 - C(3,2)/C(4,2) = 0.5
    # problem 1: unsolved at init, solved after, 0 correct -> all capability gain
    d = decompose_progress_expected([0, 0, 1], [4, 4, 4], [1, 0, 4], 2, [1, 1, 1])
    assert d["progress"] == 2.0
    assert d["distillation"] == pytest.approx(0.5)
    assert d["capability_gain"] == pytest.approx(1.5)
    assert d["regression"] == 0.0


def test_absolute_k():
    # relative gains: 0.5/0.5=1.0, 0.1/1.0... build a curve that plateaus at k=4
    curve = [0.2, 0.3, 0.35, 0.351, 0.3512]
    # k=2: 0.5; k=3: 0.1667; k=4: 0.00286 < 0.01 -> 4
    assert absolute_k(curve, 0.01) == (4, True)
    assert absolute_k([0.1, 0.2, 0.4], 0.01) == (3, False)
    assert absolute_k([0.0, 0.0, 0.1], 0.01) == (2, True)  # 0 -> 0 counts as converged
    assert absolute_k([0.0, 0.1, 0.1], 0.01) == (3, True)  # 0 -> 0.1 is an infinite gain
    with pytest.raises(ValueError):
        absolute_k(curve, 0.0)


def test_pass_at_k_curve():
    curve = pass_at_k_curve([4, 4], [1, 0], 3)
    assert curve == pytest.approx([0.125, 0.25, 0.375])  # problem 0: k/4, problem 1: 0
    with pytest.raises(ValueError, match="exceeds"):
        pass_at_k_curve([4, 2], [1, 0], 3)
