"""Where a built-in policy stands on the regime axis of the digit-ops task.

Guide's importance ratio on a guided token is ``pi(token | plain prompt) / pi(token | guided
prompt)``. On the built-in task the tokens the hint supplies are the two coefficient digits
of the definition the reference trace starts with (``$=3a+7b``: the ``3`` and the ``7``).
For one operator and held-out problems, :func:`measure_operator` teacher-forces the
reference trace after the plain and after the guided prompt and reports:

- ``p``: the plain policy's probability of writing the right definition, ``exp`` of the
  summed log-probs of the definition digits, averaged over problems (:func:`regime_stats`);
- quantiles of the per-token ratio ``pi(plain) / pi(hinted)`` over the definition digits
  of all problems (:func:`regime_stats`);
- greedy accuracy without and with the hint, and pass@k without the hint: the unbiased
  estimator on ``samples`` draws at temperature 1 per problem, and from ``p`` alone
  (:func:`pass_at_k_from_p`). A sampled rollout can also score with a trace that does not
  follow its own definition (a random 2-digit answer is right 1 time in 100), so the
  sampled figure is not exactly 0 where ``p`` is.

``python -m nemo_guide.backends.torch.regimes builtin:tiny-regimes`` prints the table for
every operator (the regime map's starting point; docs/reproduction.md, "Regime map", holds
the shipped policy's).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from nemo_guide.backends.torch.models import HFAdapter, TinyAdapter, load_adapter
from nemo_guide.backends.torch.sampling import generate, right_pad
from nemo_guide.core.metrics import pass_at_k
from nemo_guide.data import digit_ops
from nemo_guide.data.records import Record

Adapter = TinyAdapter | HFAdapter
DEFINITION_DIGITS = (2, 5)
"""Character offsets of ``c1`` and ``c2`` in a definition ``s=c1a+c2b`` (the solution's start)."""
QUANTILES = (0.1, 0.5, 0.9)


def regime_stats(plain: torch.Tensor, hinted: torch.Tensor, quantiles: Sequence[float] = QUANTILES) -> dict[str, torch.Tensor]:
    """The plain policy's probability of the hint-supplied tokens, and the per-token ratio's quantiles.

    Args:
        plain: log-probs of the ``D`` hint-supplied tokens of ``N`` problems under the
            plain prompt. Shape: ``[N, D]``.
        hinted: the same tokens' log-probs under the guided prompt. Shape: ``[N, D]``.
        quantiles: levels in [0, 1] of the per-token ratio to report.

    Returns:
        ``p`` (scalar): ``mean_n exp(sum_d plain[n, d])``, the probability that a plain
        rollout writes all ``D`` tokens, averaged over problems; ``p_hinted`` the same under
        the guided prompt; ``ratio_q`` (``[len(quantiles)]``): quantiles of
        ``exp(plain - hinted)`` over all ``N * D`` tokens; ``log_ratio_mean`` (scalar).
    """
    if plain.shape != hinted.shape or plain.dim() != 2 or plain.numel() == 0:
        raise ValueError(f"plain and hinted must both be non-empty [N, D]; got {tuple(plain.shape)} and {tuple(hinted.shape)}")
    plain, hinted = plain.double(), hinted.double()
    log_ratio = (plain - hinted).flatten()  # [N*D]
    q = torch.tensor(list(quantiles), dtype=torch.float64)
    return {
        "p": plain.sum(-1).exp().mean(),
        "p_hinted": hinted.sum(-1).exp().mean(),
        "ratio_q": torch.quantile(log_ratio, q).exp(),  # exp is monotone: quantiles of the ratio
        "log_ratio_mean": log_ratio.mean(),
    }


def pass_at_k_from_p(p: torch.Tensor, k: int) -> torch.Tensor:
    """``mean_n 1 - (1 - p[n])^k``: pass@k if a rollout is right exactly when it writes the
    right definition, which it does with probability ``p[n]`` on problem ``n``. Shape: ``[N] -> []``."""
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got {k}")
    return (1 - (1 - p.double()).pow(k)).mean()


def definition_token_positions(adapter: Adapter, solution: str) -> list[int]:
    """Indices, among the tokens of ``adapter.encode(solution, False)``, of the definition's
    two coefficient digits. Raises ``ValueError`` where a digit is not a token of its own."""
    ids = adapter.encode(solution, False)
    out = []
    for offset in DEFINITION_DIGITS:
        before = adapter.encode(solution[:offset], False)
        upto = adapter.encode(solution[: offset + 1], False)
        if len(upto) != len(before) + 1 or ids[: len(upto)] != upto or adapter.decode(upto[-1:]) != solution[offset]:
            raise ValueError(f"{adapter.source}: the definition digit {solution[offset]!r} of {solution[:12]!r} is not one token; a character-level tokenizer is needed")
        out.append(len(before))
    return out


@torch.no_grad()
def response_logprobs(adapter: Adapter, prompts: Sequence[str], responses: Sequence[str]) -> list[torch.Tensor]:
    """Teacher-forced log-prob of every response token after its prompt: one ``[L_i]`` tensor each.

    Prompts are encoded as the backend encodes plain prompts (``add_special_tokens=True``),
    responses without special tokens.
    """
    seqs, starts = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = adapter.encode(prompt, True)
        seqs.append(p + adapter.encode(response, False))
        starts.append(len(p))
    ids, mask = right_pad(seqs, adapter.pad_id)  # [N, T]
    hidden = adapter.hidden(adapter.model, ids, mask)  # [N, T, H]
    logp = (hidden[:, :-1].float() @ adapter.output_weight(adapter.model).float().T).log_softmax(-1)  # [N, T-1, V]
    token_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [N, T-1]: log-prob of token t+1
    return [token_lp[i, start - 1 : len(seq) - 1] for i, (seq, start) in enumerate(zip(seqs, starts, strict=True))]


def held_out_records(op: str, n: int, seed: int = 0) -> list[Record]:
    """``n`` problems of ``op`` on held-out operand pairs (a seeded draw; all of them if fewer)."""
    candidates = list(digit_ops.pairs(held_out=True))
    chosen = random.Random(f"regimes-{seed}-{op}").sample(candidates, min(n, len(candidates)))
    return [digit_ops.make_record(op, a, b, "eval") for a, b in chosen]


@dataclass(frozen=True)
class RegimeRow:
    """One operator's measurements (see the module docstring)."""

    level: str
    op: str
    p: float
    p_hinted: float
    ratio_p10: float
    ratio_median: float
    ratio_p90: float
    greedy_plain: float
    greedy_hinted: float
    pass_k_plain: float
    """Unbiased pass@k over ``samples`` sampled rollouts per problem."""
    pass_k_from_p: float
    """:func:`pass_at_k_from_p` of the teacher-forced definition probabilities."""
    k: int
    problems: int
    samples: int


def _answers_correct(adapter: Adapter, prompts: list[str], records: list[Record], temperature: float, generator: torch.Generator | None) -> list[bool]:
    encoded = [adapter.encode(p, True) for p in prompts]
    responses, _ = generate(
        adapter.step(adapter.model), encoded, pad_id=adapter.pad_id, eos_ids=adapter.eos_ids, max_new_tokens=64, temperature=temperature, generator=generator
    )
    return [adapter.decode(r).rsplit(digit_ops.ANSWER_MARKER, 1)[-1] == rec.answer for r, rec in zip(responses, records, strict=True)]


@torch.no_grad()
def measure_operator(adapter: Adapter, op: str, *, problems: int = 64, samples: int = 16, k: int = 8, seed: int = 0) -> RegimeRow:
    """The regime measurements of ``op`` on ``problems`` held-out problems (``samples`` >= ``k``
    draws at temperature 1 per problem for pass@k without the hint)."""
    if not 1 <= k <= samples:
        raise ValueError(f"pass@k needs 1 <= k <= samples; got k={k}, samples={samples}")
    was_training = adapter.model.training
    adapter.model.eval()
    records = held_out_records(op, problems, seed)
    plain = [r.problem for r in records]
    guided = [digit_ops.HINT_TEMPLATE.replace("{hint}", r.hint).replace("{problem}", r.problem) for r in records]
    solutions = [r.solution for r in records]
    pos = torch.tensor([definition_token_positions(adapter, s) for s in solutions])  # [N, 2]
    lp_plain = torch.stack([lp[i] for lp, i in zip(response_logprobs(adapter, plain, solutions), pos, strict=True)])  # [N, 2]
    lp_hinted = torch.stack([lp[i] for lp, i in zip(response_logprobs(adapter, guided, solutions), pos, strict=True)])  # [N, 2]
    stats = regime_stats(lp_plain, lp_hinted)
    greedy_plain = _answers_correct(adapter, plain, records, 0.0, None)
    greedy_hinted = _answers_correct(adapter, guided, records, 0.0, None)
    gen = torch.Generator().manual_seed(seed)
    sampled = _answers_correct(adapter, plain * samples, records * samples, 1.0, gen)  # [samples * N], sample-major
    correct = [sum(sampled[s * len(records) + i] for s in range(samples)) for i in range(len(records))]
    adapter.model.train(was_training)
    q = stats["ratio_q"].tolist()
    return RegimeRow(
        level=digit_ops.kind_of(op),
        op=op,
        p=float(stats["p"]),
        p_hinted=float(stats["p_hinted"]),
        ratio_p10=q[0],
        ratio_median=q[1],
        ratio_p90=q[2],
        greedy_plain=sum(greedy_plain) / len(records),
        greedy_hinted=sum(greedy_hinted) / len(records),
        pass_k_plain=sum(pass_at_k(samples, c, k) for c in correct) / len(records),
        pass_k_from_p=float(pass_at_k_from_p(lp_plain.double().sum(-1).exp(), k)),
        k=k,
        problems=len(records),
        samples=samples,
    )


def markdown_table(rows: Sequence[RegimeRow]) -> str:
    """One line per operator: level, operator, ``p``, ratio quantiles, greedy accuracy, pass@k."""
    k = rows[0].k if rows else 8
    lines = [
        f"| level | op | p (plain, right definition) | ratio p10 | ratio median | ratio p90 | greedy no hint | greedy hint "
        f"| pass@{k} no hint (sampled) | pass@{k} from p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.level} | `{r.op}` | {r.p:.3g} | {r.ratio_p10:.3g} | {r.ratio_median:.3g} | {r.ratio_p90:.3g} "
            f"| {r.greedy_plain:.2f} | {r.greedy_hinted:.2f} | {r.pass_k_plain:.2f} | {r.pass_k_from_p:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_guide.backends.torch.regimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("policy", help="builtin:tiny-regimes, builtin:tiny, or a .safetensors file of the tiny model")
    parser.add_argument("--ops", default="".join(digit_ops.DEFINITIONS), help="operators to measure (default: all)")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object per operator instead of the table")
    args = parser.parse_args(argv)
    adapter = load_adapter(args.policy, torch.float32, torch.device("cpu"))
    rows = [measure_operator(adapter, op, problems=args.problems, samples=args.samples, k=args.k, seed=args.seed) for op in args.ops]
    if args.json:
        import json

        for r in rows:
            print(json.dumps(asdict(r)))
    else:
        print(markdown_table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
