import pytest
import torch

from nemo_guide.core.guidance import assemble_groups, select_for_guidance

T, F = True, False


def test_thresholds_hand_computed():
    # 4 prompts x G=4: 0/4, 1/4, 2/4, 4/4 correct
    correct = torch.tensor([[F, F, F, F], [T, F, F, F], [T, T, F, F], [T, T, T, T]])
    assert select_for_guidance(correct, "all_incorrect").tolist() == [T, F, F, F]
    # fraction < 0.25: 0.0 yes, 0.25 no (strict), 0.5 no
    assert select_for_guidance(correct, "mostly_incorrect").tolist() == [T, F, F, F]
    assert select_for_guidance(correct, "always").tolist() == [T, T, T, T]
    assert select_for_guidance(correct, "never").tolist() == [F, F, F, F]


def test_mostly_incorrect_is_strict_fraction():
    # G=8: 1/8 = 0.125 < 0.25 -> guided; 2/8 = 0.25 -> not guided
    correct = torch.zeros(2, 8, dtype=torch.bool)
    correct[0, 0] = True
    correct[1, :2] = True
    assert select_for_guidance(correct, "mostly_incorrect").tolist() == [T, F]


def test_unknown_threshold_lists_valid_names():
    with pytest.raises(ValueError, match="'all_incorrect', 'mostly_incorrect', 'always', 'never'"):
        select_for_guidance(torch.zeros(2, 2, dtype=torch.bool), "sometimes")


def test_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        select_for_guidance(torch.zeros(4, dtype=torch.bool), "always")


def test_assemble_union_layout():
    group, guided, train = assemble_groups(torch.tensor([F, T, F, T]), group_size=2, mode="union")
    assert group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 1, 1, 3, 3]
    assert guided.tolist() == [F] * 8 + [T] * 4
    assert train.all()


def test_assemble_replace_drops_failed_plain_rollouts():
    group, guided, train = assemble_groups(torch.tensor([F, T, F]), group_size=2, mode="replace")
    assert group.tolist() == [0, 0, -1, -1, 2, 2, 1, 1]
    assert train.tolist() == [T, T, F, F, T, T, T, T]
    assert guided.tolist() == [F] * 6 + [T] * 2


def test_registry_rejects_double_registration():
    from nemo_guide.core.guidance import THRESHOLDS

    with pytest.raises(ValueError, match="registered twice"):
        THRESHOLDS.register("always")(lambda c: c)
