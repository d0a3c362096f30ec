"""Build the embedded default policies: SFT on the digit-ops mixture.

``nemo-guide warmstart`` (or :func:`build_warmstart`) trains a fresh model on
:func:`nemo_guide.data.digit_ops.sft_example`, for one of two architectures (``--arch``):

- ``tiny`` (default): the :class:`TinyDecoder`, written as one safetensors file. The
  package ships it as ``nemo_guide/assets/tiny_digit_ops.safetensors`` (``builtin:tiny``);
  its metadata records the command's arguments, the task version and the probe accuracies.
- ``llama``: a Hugging Face ``LlamaForCausalLM`` with a character-level tokenizer
  (``tiny_llama.py``), written as a Hugging Face directory whose ``build.json`` holds the
  same record. The package ships it as ``nemo_guide/assets/tiny_llama_digit_ops/``
  (``builtin:tiny-llama``), the weights the NeMo-Aligner/Megatron path converts.

``--regimes`` switches the SFT mixture to ``sft_example(regimes=True)`` (the rare and wrong
operators added, see ``digit_ops``); the package ships that ``tiny`` build as
``nemo_guide/assets/tiny_digit_ops_regimes.safetensors`` (``builtin:tiny-regimes``), whose
probe also measures the rare and wrong operators.

Both go through the embedded backend's model adapters (``models.py``): one SFT loss on
final hidden states and the output weight, one greedy probe through ``sampling.generate``.
Prompts are encoded with ``add_special_tokens=True`` as the backend encodes plain prompts
(the Llama tokenizer prepends ``<bos>``, the tiny one adds nothing), solutions without.
A stale build is detected by ``tests/test_builtin.py`` and ``tests/test_tiny_llama.py``.
The probe (greedy decoding of 5 x 64 fresh problems) costs more than a short build;
``probe=False`` skips it, and the record then says so.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from nemo_guide.backends.torch.models import ASSETS, BUILTIN_MODELS, HFAdapter, TinyAdapter
from nemo_guide.backends.torch.sampling import generate, right_pad
from nemo_guide.backends.torch.tiny import CharTokenizer, TinyConfig, TinyDecoder, save_tiny
from nemo_guide.data import digit_ops
from nemo_guide.errors import RunError

ASSET = ASSETS / BUILTIN_MODELS["builtin:tiny"]
LLAMA_ASSET = ASSETS / BUILTIN_MODELS["builtin:tiny-llama"]
REGIMES_ASSET = ASSETS / BUILTIN_MODELS["builtin:tiny-regimes"]


@dataclass(frozen=True)
class ArchDefaults:
    """The shipped build's settings of one ``--arch``."""

    asset: Path
    steps: int
    batch_size: int
    lr: float


ARCHS = {
    "tiny": ArchDefaults(ASSET, steps=2500, batch_size=64, lr=2e-3),
    "llama": ArchDefaults(LLAMA_ASSET, steps=2000, batch_size=64, lr=2e-3),
}
"""``--arch`` -> where its asset lives and the settings it was built with."""
DEFAULT_STEPS = ARCHS["tiny"].steps
DEFAULT_BATCH = ARCHS["tiny"].batch_size
DEFAULT_LR = ARCHS["tiny"].lr
PROBE_N = 64
PROBE_SEED = 12345

Adapter = TinyAdapter | HFAdapter


def fresh_adapter(arch: str) -> Adapter:
    """A freshly initialised model of ``arch`` with its tokenizer (seed torch first)."""
    if arch == "tiny":
        return TinyAdapter(TinyDecoder(TinyConfig(vocab_size=CharTokenizer().vocab_size)), "warmstart")
    if arch == "llama":
        from nemo_guide.backends.torch import tiny_llama

        return HFAdapter(tiny_llama.new_model(), tiny_llama.new_tokenizer(), "warmstart --arch llama")
    raise RunError(f"warmstart --arch {arch!r}: choose one of {', '.join(ARCHS)}")


def sft_batch(rng: random.Random, batch_size: int, adapter: Adapter, regimes: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [B, T], attention_mask [B, T], loss_mask [B, T])`` for next-token SFT on
    ``digit_ops.sft_example(rng, regimes=regimes)``.

    ``loss_mask[b, t]`` is True where token ``t + 1`` is a solution or EOS token.
    """
    seqs, starts = [], []
    for _ in range(batch_size):
        _, prompt, solution = digit_ops.sft_example(rng, regimes=regimes)
        p = adapter.encode(prompt, True)
        seqs.append(p + adapter.encode(solution, False) + [adapter.eos_ids[0]])
        starts.append(len(p))
    ids, mask = right_pad(seqs, adapter.pad_id)
    positions = torch.arange(ids.shape[1])[None, :]  # [1, T]
    target_pos = positions + 1
    loss_mask = (target_pos >= torch.tensor(starts)[:, None]) & (target_pos < mask.sum(-1, keepdim=True))
    return ids, mask, loss_mask


def sft_loss(adapter: Adapter, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over ``loss_mask``. ``ids``, ``mask``, ``loss_mask``: Shape: ``[B, T]``."""
    hidden = adapter.hidden(adapter.model, ids, mask)  # [B, T, H]
    logits = hidden[:, :-1] @ adapter.output_weight(adapter.model).T  # [B, T-1, V]
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
    m = loss_mask[:, :-1].float()
    return (nll * m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def probe_accuracy(policy: TinyDecoder | Adapter, n: int = PROBE_N, seed: int = PROBE_SEED, *, regimes: bool = False) -> dict[str, float]:
    """Greedy accuracy on fresh problems: known unhinted, novel/unseen hinted and unhinted;
    with ``regimes`` also rare and wrong, hinted and unhinted (drawn after the others, so the
    first five cases are the same problems either way).

    ``policy``: a :class:`TinyDecoder` or an adapter of ``models.py`` (``load_adapter``).
    """
    adapter = TinyAdapter(policy, "probe") if isinstance(policy, TinyDecoder) else policy
    model = adapter.model
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    cases = {
        "known": (digit_ops.KNOWN, False),
        "novel_hinted": (digit_ops.NOVEL, True),
        "unseen_hinted": (digit_ops.UNSEEN, True),
        "novel": (digit_ops.NOVEL, False),
        "unseen": (digit_ops.UNSEEN, False),
    }
    if regimes:
        cases.update({
            "rare_hinted": (digit_ops.RARE, True),
            "rare": (digit_ops.RARE, False),
            "wrong_hinted": (digit_ops.WRONG, True),
            "wrong": (digit_ops.WRONG, False),
        })
    for name, (ops, hinted) in cases.items():
        records = [digit_ops.make_record(rng.choice(list(ops)), rng.randrange(100), rng.randrange(100), "probe") for _ in range(n)]
        prompts = [
            adapter.encode(digit_ops.HINT_TEMPLATE.replace("{hint}", r.hint).replace("{problem}", r.problem) if hinted else r.problem, True)
            for r in records
        ]
        responses, _ = generate(adapter.step(model), prompts, pad_id=adapter.pad_id, eos_ids=adapter.eos_ids, max_new_tokens=64, temperature=0.0)
        correct = [adapter.decode(resp).rsplit(digit_ops.ANSWER_MARKER, 1)[-1] == r.answer for resp, r in zip(responses, records, strict=True)]
        out[name] = sum(correct) / n
    model.train(was_training)
    return out


def build_warmstart(
    out: str | Path | None = None,
    *,
    arch: str = "tiny",
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    regimes: bool = False,
    probe: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the warm-start policy of ``arch`` and write it to ``out``; returns the build record.

    Args:
        out: a ``.safetensors`` file (``tiny``) or a directory (``llama``); default: the
            packaged asset of ``arch`` (``ARCHS[arch].asset``; ``REGIMES_ASSET`` with
            ``regimes``, ``tiny`` only).
        steps, batch_size, lr: default: the shipped build's (``ARCHS[arch]``).
        regimes: SFT on the regimes mixture (``digit_ops.sft_example(regimes=True)``, the
            rare and wrong operators added) and probe them too; recorded as
            ``"regimes": true`` with those operators' definitions and ``p``
            (``regime_ops``; a default build's record has neither key, as before the knob).
        probe: measure greedy accuracy on fresh problems afterwards (:func:`probe_accuracy`)
            and record it in ``probe_accuracy``. ``nemo-guide warmstart`` always probes (the
            shipped asset's record is checked against it); ``False`` skips it, and the
            record's ``probe`` field says it was skipped and ``probe_accuracy`` is null.
    """
    if arch not in ARCHS:
        raise RunError(f"warmstart --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    defaults = ARCHS[arch]
    if out is None and regimes and arch != "tiny":
        raise RunError(f"warmstart --regimes --arch {arch}: only the tiny build is shipped (builtin:tiny-regimes); give --out")
    out = (REGIMES_ASSET if regimes else defaults.asset) if out is None else out
    steps = defaults.steps if steps is None else steps
    batch_size = defaults.batch_size if batch_size is None else batch_size
    lr = defaults.lr if lr is None else lr
    torch.manual_seed(seed)
    rng = random.Random(seed)
    adapter = fresh_adapter(arch)
    model = adapter.model
    model.train()
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
        ids, mask, loss_mask = sft_batch(rng, batch_size, adapter, regimes)
        loss = sft_loss(adapter, ids, mask, loss_mask)
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
        accuracy = probe_accuracy(adapter, regimes=regimes)
        probe_note = f"greedy accuracy on {PROBE_N} fresh problems per case, seed {PROBE_SEED}"
        log("warmstart greedy accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    else:
        accuracy = None
        probe_note = "skipped (build_warmstart(probe=False)): no accuracy measured"
        log("warmstart: accuracy probe skipped")
    parameters = sum(p.numel() for p in model.parameters())
    record = {
        "command": f"nemo-guide warmstart{' --arch llama' if arch == 'llama' else ''}{' --regimes' if regimes else ''} "
        f"--steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed}",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": loss_value,
        "train_seconds": round(seconds, 1),
        "probe": probe_note,
        "probe_accuracy": accuracy,
        "parameters": parameters,
    }
    if regimes:
        record.update(
            regimes=True,
            regime_ops={
                op: {"definition": list(digit_ops.DEFINITIONS[op]), "shown_instead": list(digit_ops.RARE_WRONG[op]), "p": p}
                for op, p in digit_ops.RARE_P.items()
            },
        )
    if arch == "tiny":
        save_tiny(out, model, {"task_version": str(digit_ops.TASK_VERSION), "build": json.dumps(record, sort_keys=True)})
    else:
        from nemo_guide.backends.torch import tiny_llama

        total = round(time.perf_counter() - start, 1)
        record.update(arch=arch, task_version=digit_ops.TASK_VERSION, torch_threads=torch.get_num_threads(), train_and_probe_seconds=total)
        tiny_llama.save_tiny_llama(out, model, record)
    log(f"wrote {out} ({parameters:,} parameters, {seconds:.0f}s)")
    return record
