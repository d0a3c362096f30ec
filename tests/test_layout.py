"""The row layout, the realignment between Aligner's ``[b, s-1]`` prediction columns and the
``[N, L]`` layout of the core loss, and the last-stage log-probs (CPU, no Megatron)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nemo_guide.backends.megatron.last_stage import response_logprobs
from nemo_guide.backends.megatron.layout import lay_out, realign, response_positions

# Three rollouts of one step (pad id 0):
# 0: plain, prompt [11, 12], response [21, 22, 23]
# 1: guided, plain prompt [13, 14], hinted prompt [13, 14, 31, 32, 33] (longer), response [24]
# 2: an empty response behind prompt [15]
PLAIN = [[11, 12], [13, 14], [15]]
SAMPLE = [[11, 12], [13, 14, 31, 32, 33], [15]]
RESPONSES = [[21, 22, 23], [24], []]


def test_lay_out_rows_with_a_hinted_prompt_and_padding_rows():
    rows = lay_out(SAMPLE, RESPONSES, 0, rows=4)
    # seq_len = the longest prompt + response: 5 + 1 = 6; row 3 is a padding row
    assert rows.tokens.tolist() == [
        [11, 12, 21, 22, 23, 0],
        [13, 14, 31, 32, 33, 24],
        [15, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    assert rows.prompt_lengths.tolist() == [2, 5, 1, 0]
    assert rows.response_lengths.tolist() == [3, 1, 0, 0]
    plain = lay_out(PLAIN, RESPONSES, 7, seq_len=6)
    assert plain.tokens.tolist() == [[11, 12, 21, 22, 23, 7], [13, 14, 24, 7, 7, 7], [15, 7, 7, 7, 7, 7]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": [[1], []], "responses": [[2], [3]]}, "rollout 1 has an empty prompt"),
        ({"prompts": [[1]], "responses": [[2], [3]]}, "1 prompts but 2 responses"),
        ({"prompts": [[1], [2]], "responses": [[3], [4]], "rows": 1}, "rows = 1 cannot hold 2 rollouts"),
        ({"prompts": [[1], [2, 3]], "responses": [[4], [5]], "seq_len": 2}, r"rollout 1 \(prompt 2 \+ response 1 tokens\); pass seq_len >= 3"),
    ],
)
def test_lay_out_refuses_what_does_not_fit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lay_out(pad_id=0, **kwargs)


def test_response_positions_by_hand():
    # behind the hinted prompts: row 0 tokens 21, 22, 23 are predicted at positions 1, 2, 3
    # (prompt 2 - 1 + t), row 1's single token 24 at position 4 (prompt 5 - 1), row 2 has none
    rows, cols, steps = response_positions(torch.tensor([2, 5, 1]), torch.tensor([3, 1, 0]), width=5)
    assert rows.tolist() == [0, 0, 0, 1]
    assert cols.tolist() == [1, 2, 3, 4]
    assert steps.tolist() == [0, 1, 2, 0]
    tokens = lay_out(SAMPLE, RESPONSES, 0).tokens
    assert tokens[rows, cols + 1].tolist() == [21, 22, 23, 24]
    empty = response_positions(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), width=0)
    assert [t.tolist() for t in empty] == [[], [], []]


def test_response_positions_refuses_aligner_sequence_ends():
    # Aligner's response_lengths key is prompt + response (5 + 1 = 6 for row 1), one past the layout
    with pytest.raises(ValueError, match="pass response_lengths - prompt_lengths"):
        response_positions(torch.tensor([2, 5]), torch.tensor([5, 6]), width=5)
    with pytest.raises(ValueError, match="needs a prompt of >= 1 token"):
        response_positions(torch.tensor([0]), torch.tensor([1]), width=5)
    with pytest.raises(ValueError, match="must be >= 0"):
        response_positions(torch.tensor([1]), torch.tensor([-1]), width=5)


def test_realign_sampling_columns_to_the_loss_layout_and_behind_the_plain_prompt():
    # Aligner-layout values behind the hinted prompts, [b, s-1] = [3, 5]: v[i, j] = 10 i + j
    values = 10 * torch.arange(3.0)[:, None] + torch.arange(5.0)[None, :]
    lengths = torch.tensor([3, 1, 0])
    sample, plain = torch.tensor([2, 5, 1]), torch.tensor([2, 2, 1])
    # row 0: columns 1..3 -> steps 0..2; row 1: column 4 -> step 0; row 2: nothing
    got = realign(values, lengths, src_prompt_lengths=sample, dst_prompt_lengths=None, width=3)
    assert got.tolist() == [[1, 2, 3], [14, 0, 0], [0, 0, 0]]
    # behind the plain prompts (s = 5, so 4 columns): row 1's token sits at column 2 - 1 = 1
    moved = realign(values, lengths, src_prompt_lengths=sample, dst_prompt_lengths=plain, width=4)
    assert moved.tolist() == [[0, 1, 2, 3], [0, 14, 0, 0], [0, 0, 0, 0]]
    # and back from the plain columns to [N, L]
    assert torch.equal(realign(moved, lengths, src_prompt_lengths=plain, dst_prompt_lengths=None, width=3), got)


def test_realign_a_loss_mask_to_aligners_mask_key():
    # Aligner's mask is True on columns prompt - 1 .. prompt + response - 2 of the [b, s-1] layout
    loss_mask = torch.tensor([[True, False, True], [True, False, False], [False, False, False]])
    got = realign(loss_mask, torch.tensor([3, 1, 0]), src_prompt_lengths=None, dst_prompt_lengths=torch.tensor([2, 2, 1]), width=4)
    assert got.dtype == torch.bool
    assert got.tolist() == [[False, True, False, True], [False, True, False, False], [False] * 4]


def test_realign_refuses_a_layout_too_narrow():
    with pytest.raises(ValueError, match="row 1: prompt 5 \\+ response 1 tokens need 5 prediction columns, the layout has 4"):
        realign(torch.zeros(2, 3), torch.tensor([3, 1]), src_prompt_lengths=None, dst_prompt_lengths=torch.tensor([2, 5]), width=4)
    with pytest.raises(ValueError, match=r"values must be \[b, W\] with b = 2"):
        realign(torch.zeros(3, 3), torch.tensor([3, 1]), src_prompt_lengths=None, dst_prompt_lengths=None, width=3)


def _realign_loop(values, lengths, src, dst, width):
    """Reference: one token at a time."""
    out = torch.zeros(values.shape[0], width, dtype=values.dtype)
    for i, n in enumerate(lengths.tolist()):
        for t in range(n):
            s = t if src is None else int(src[i]) - 1 + t
            d = t if dst is None else int(dst[i]) - 1 + t
            out[i, d] = values[i, s]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_over_random_lengths(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    plain = torch.randint(1, 6, (n,), generator=g)
    sample = plain + torch.randint(0, 8, (n,), generator=g) * (torch.rand(n, generator=g) < 0.5)  # hinted: longer
    lengths = torch.randint(0, 7, (n,), generator=g)
    width = max(int(lengths.max()), 1)
    inside = torch.arange(width)[None, :] < lengths[:, None]  # [N, L]
    values = torch.randn(n, width, generator=g) * inside
    s_plain = int((plain + lengths).max()) + int(torch.randint(0, 3, (1,), generator=g))  # trailing padding columns
    s_sample = int((sample + lengths).max())
    behind_sample = realign(values, lengths, src_prompt_lengths=None, dst_prompt_lengths=sample, width=s_sample - 1)
    assert torch.equal(behind_sample, _realign_loop(values, lengths, None, sample, s_sample - 1))
    behind_plain = realign(behind_sample, lengths, src_prompt_lengths=sample, dst_prompt_lengths=plain, width=s_plain - 1)
    assert torch.equal(behind_plain, _realign_loop(behind_sample, lengths, sample, plain, s_plain - 1))
    back = realign(behind_plain, lengths, src_prompt_lengths=plain, dst_prompt_lengths=None, width=width)
    assert torch.equal(back, values)
    # nothing but response tokens survives a trip through a prediction layout
    noisy = behind_sample + torch.randn(behind_sample.shape, generator=g) * (behind_sample == 0)
    assert torch.equal(realign(noisy, lengths, src_prompt_lengths=sample, dst_prompt_lengths=None, width=width), values)
    # the columns hold the response tokens of the laid-out rows
    prompts = [[1] * int(p) for p in sample]
    responses = [torch.randint(2, 50, (int(k),), generator=g).tolist() for k in lengths]
    rows = lay_out(prompts, responses, 0)
    r, c, t = response_positions(rows.prompt_lengths, rows.response_lengths, rows.tokens.shape[1] - 1)
    assert rows.tokens[r, c + 1].tolist() == [tok for resp in responses for tok in resp]
    assert torch.equal(t, torch.cat([torch.arange(int(k)) for k in lengths]))


# -- last stage --------------------------------------------------------------------------


def _reference(hidden, weight, tokens, prompt_lengths, response_lengths, width, temperature):
    """Full logits, log-softmax, one response token at a time: log-probs and entropies [b, L]."""
    logp = torch.log_softmax(hidden.transpose(0, 1) @ weight.T / temperature, dim=-1)  # [b, s, V]
    lp = torch.zeros(tokens.shape[0], width, dtype=logp.dtype)
    ent = torch.zeros_like(lp)
    for i in range(tokens.shape[0]):
        for t in range(int(response_lengths[i])):
            pos = int(prompt_lengths[i]) - 1 + t
            lp[i, t] = logp[i, pos, tokens[i, pos + 1]]
            ent[i, t] = -(logp[i, pos].exp() * logp[i, pos]).sum()
    return lp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_full_logits_values_and_gradients(temperature):
    torch.manual_seed(3)
    rows = lay_out(SAMPLE, RESPONSES, 0, rows=4)  # with a padding row and an empty response
    s, b, h, v = rows.tokens.shape[1], rows.tokens.shape[0], 8, 40
    hidden = torch.randn(s, b, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    lp, ent = response_logprobs(hidden, weight, rows.tokens, rows.prompt_lengths, rows.response_lengths, width=4,
                                temperature=temperature, chunk_size=3, return_entropy=True)
    ref_lp, ref_ent = _reference(hidden, weight, rows.tokens, rows.prompt_lengths, rows.response_lengths, 4, temperature)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    assert lp[:, 3].abs().max() == 0 and lp[1:, 1:].abs().max() == 0  # zero outside the responses
    coef = torch.randn(b, 4, dtype=torch.float64)
    got = torch.autograd.grad((coef * lp).sum() + (coef * ent).sum(), (hidden, weight))
    want = torch.autograd.grad((coef * ref_lp).sum() + (coef * ref_ent).sum(), (hidden, weight))
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_)


def test_response_logprobs_equal_aligner_columns_realigned():
    """Scoring on hidden states == Aligner's [b, s-1] log-probs of every column, realigned."""
    torch.manual_seed(4)
    rows = lay_out(SAMPLE, RESPONSES, 0)
    hidden, weight = torch.randn(rows.tokens.shape[1], 3, 8), torch.randn(40, 8)
    lp, ent = response_logprobs(hidden, weight, rows.tokens, rows.prompt_lengths, rows.response_lengths, width=3)
    assert ent is None
    logp = torch.log_softmax(hidden.transpose(0, 1) @ weight.T, dim=-1)  # [b, s, V]
    columns = logp[:, :-1].gather(-1, rows.tokens[:, 1:, None]).squeeze(-1)  # [b, s-1]: column j scores token j+1
    expected = realign(columns, rows.response_lengths, src_prompt_lengths=rows.prompt_lengths, dst_prompt_lengths=None, width=3)
    torch.testing.assert_close(lp, expected)


def test_response_logprobs_of_an_all_padding_micro_batch_stay_attached():
    rows = lay_out([[5]], [[]], 0, rows=2)
    hidden = torch.randn(1, 2, 8, requires_grad=True)
    lp, _ = response_logprobs(hidden, torch.randn(40, 8), rows.tokens, rows.prompt_lengths, rows.response_lengths, width=2)
    assert lp.tolist() == [[0.0, 0.0], [0.0, 0.0]] and lp.requires_grad
    lp.sum().backward()  # a loss on it sends zero gradients down the pipeline
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_response_logprobs_refuse_mismatched_shapes():
    rows = lay_out(SAMPLE, RESPONSES, 0)
    weight = torch.randn(40, 8)
    with pytest.raises(ValueError, match="under sequence parallelism gather"):
        response_logprobs(torch.randn(3, 3, 8), weight, rows.tokens, rows.prompt_lengths, rows.response_lengths, width=3)
    with pytest.raises(ValueError, match=r"width = 2 is shorter than the longest response \(3 tokens\)"):
        response_logprobs(torch.randn(6, 3, 8), weight, rows.tokens, rows.prompt_lengths, rows.response_lengths, width=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        response_logprobs(torch.randn(6, 3, 8), weight, rows.tokens, rows.prompt_lengths, rows.response_lengths, width=3, temperature=0)


def test_layout_and_last_stage_import_no_megatron():
    code = (
        "import sys, nemo_guide.backends.megatron.layout, nemo_guide.backends.megatron.last_stage\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformer_engine', 'nemo', 'nemo_aligner'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
