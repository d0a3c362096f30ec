"""Build the embedded default policy: SFT of the tiny decoder on the digit-ops mixture.

``nemo-guide warmstart`` (or :func:`build_warmstart`) trains a fresh :class:`TinyDecoder` on
:func:`nemo_guide.data.digit_ops.sft_example` and writes one safetensors file. The package
ships the result as ``nemo_guide/assets/tiny_digit_ops.safetensors`` (``builtin:tiny``);
its metadata records the command's arguments, the task version and the accuracies the
probe measured, so a stale file is detected (``tests/test_builtin.py``). The probe (greedy
decoding of 5 x 64 fresh problems) costs more than a short build; ``probe=False`` skips
it, and the record then says so.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from nemo_guide.backends.torch.sampling import generate, right_pad
from nemo_guide.backends.torch.tiny import CharTokenizer, TinyConfig, TinyDecoder, sampling_step, save_tiny
from nemo_guide.data import digit_ops

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny_digit_ops.safetensors"
DEFAULT_STEPS = 2500
DEFAULT_BATCH = 64
DEFAULT_LR = 2e-3
PROBE_N = 64
PROBE_SEED = 12345


def sft_batch(rng: random.Random, batch_size: int, tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [B, T], attention_mask [B, T], loss_mask [B, T])`` for next-token SFT.

    ``loss_mask[b, t]`` is True where token ``t + 1`` is a solution or EOS token.
    """
    seqs, starts = [], []
    for _ in range(batch_size):
        _, prompt, solution = digit_ops.sft_example(rng)
        p = tok.encode(prompt)
        seqs.append(p + tok.encode(solution) + [tok.eos_token_id])
        starts.append(len(p))
    ids, mask = right_pad(seqs, tok.pad_token_id)
    positions = torch.arange(ids.shape[1])[None, :]  # [1, T]
    target_pos = positions + 1
    loss_mask = (target_pos >= torch.tensor(starts)[:, None]) & (target_pos < mask.sum(-1, keepdim=True))
    return ids, mask, loss_mask


def sft_loss(model: TinyDecoder, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    hidden, _ = model(ids, mask)
    logits = hidden[:, :-1] @ model.output_weight.T  # [B, T-1, V]
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
    m = loss_mask[:, :-1].float()
    return (nll * m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def probe_accuracy(model: TinyDecoder, n: int = PROBE_N, seed: int = PROBE_SEED) -> dict[str, float]:
    """Greedy accuracy on fresh problems: known unhinted, novel/unseen hinted and unhinted."""
    tok = CharTokenizer()
    rng = random.Random(seed)
    model.eval()
    out: dict[str, float] = {}
    cases = {
        "known": (digit_ops.KNOWN, False),
        "novel_hinted": (digit_ops.NOVEL, True),
        "unseen_hinted": (digit_ops.UNSEEN, True),
        "novel": (digit_ops.NOVEL, False),
        "unseen": (digit_ops.UNSEEN, False),
    }
    for name, (ops, hinted) in cases.items():
        records = [digit_ops.make_record(rng.choice(list(ops)), rng.randrange(100), rng.randrange(100), "probe") for _ in range(n)]
        prompts = [
            tok.encode(digit_ops.HINT_TEMPLATE.replace("{hint}", r.hint).replace("{problem}", r.problem) if hinted else r.problem)
            for r in records
        ]
        responses, _ = generate(
            sampling_step(model), prompts, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id], max_new_tokens=64, temperature=0.0
        )
        correct = [tok.decode(resp).rsplit(digit_ops.ANSWER_MARKER, 1)[-1] == r.answer for resp, r in zip(responses, records, strict=True)]
        out[name] = sum(correct) / n
    model.train()
    return out


def build_warmstart(
    out: str | Path = ASSET,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    probe: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the warm-start policy and write it to ``out``; returns the build record.

    Args:
        probe: measure greedy accuracy on fresh problems afterwards (:func:`probe_accuracy`)
            and record it in ``probe_accuracy``. ``nemo-guide warmstart`` always probes (the
            shipped asset's record is checked against it); ``False`` skips it, and the
            record's ``probe`` field says it was skipped and ``probe_accuracy`` is null.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = CharTokenizer()
    model = TinyDecoder(TinyConfig(vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))

    def lr_at(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.perf_counter()
    loss_value = float("nan")
    for i in range(steps):
        ids, mask, loss_mask = sft_batch(rng, batch_size, tok)
        loss = sft_loss(model, ids, mask, loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"warmstart step {i + 1}/{steps}  loss {loss_value:.4f}  {time.perf_counter() - start:.0f}s")
    seconds = time.perf_counter() - start
    if probe:
        accuracy = probe_accuracy(model)
        probe_note = f"greedy accuracy on {PROBE_N} fresh problems per case, seed {PROBE_SEED}"
        log("warmstart greedy accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    else:
        accuracy = None
        probe_note = "skipped (build_warmstart(probe=False)): no accuracy measured"
        log("warmstart: accuracy probe skipped")
    record = {
        "command": f"nemo-guide warmstart --steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed}",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": loss_value,
        "train_seconds": round(seconds, 1),
        "probe": probe_note,
        "probe_accuracy": accuracy,
        "parameters": model.num_parameters(),
    }
    save_tiny(out, model, {"task_version": str(digit_ops.TASK_VERSION), "build": json.dumps(record, sort_keys=True)})
    log(f"wrote {out} ({model.num_parameters():,} parameters, {seconds:.0f}s)")
    return record
