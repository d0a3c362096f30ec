"""Generation throughput: the embedded backend's sampling loop vs Hugging Face ``generate()``.

For each model and batch size, the same left-padded prompts (seeded, lengths varying from
row to row) get exactly ``--new-tokens`` tokens from each variant (no reachable EOS), greedy
or, with ``--sample``, temperature 1 from a fixed seed (no top-k/top-p on either side):

- ``project``: ``nemo_guide.backends.torch.sampling.generate`` through the model's adapter
  step, the loop the trainer samples rollouts with;
- ``before`` (with ``--before PATH``): the same, with the checkout at PATH first on
  ``sys.path`` (e.g. the main branch), to print before/after columns from one run;
- ``hf``: ``model.generate()`` of transformers (Hugging Face models only).

Models: ``smollm2-135m`` (SmolLM2-135M's Llama architecture: hidden 576, 30 layers, 9 heads,
3 KV heads, intermediate 1536, vocabulary 49152, tied embeddings; randomly initialised from
a seeded config, nothing downloaded), ``tiny-llama`` (``builtin:tiny-llama``, a Hugging Face
Llama) and ``tiny`` (``builtin:tiny``, the built-in character decoder: no ``hf`` column).

Every (model, batch, variant) runs in a fresh subprocess: one warm-up generation, then
``--repeats`` timed ones (median). Variants are interleaved within each of ``--rounds``
rounds (their order rotates from round to round), and the table shows medians over rounds
of tokens/s (wall clock) and the ratios, plus whether greedy variants produced the same
tokens. Run on an otherwise idle machine; ``--threads`` sets torch's intra-op threads.

    python benchmarks/generate.py                                   # the full grid (minutes)
    python benchmarks/generate.py --before /path/to/main/checkout   # before/after side by side
    python benchmarks/generate.py --models tiny --batches 8 --rounds 1 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _subprocess import add_benchmark_arguments, parse_or_run_child, run_child  # benchmarks/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]

SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""SmolLM2-135M's ``LlamaConfig`` (its published architecture; weights random)."""

MODELS = {
    "smollm2-135m": {"prompt_tokens": 32, "new_tokens": 64},
    "tiny-llama": {"prompt_tokens": 16, "new_tokens": 64},
    "tiny": {"prompt_tokens": 16, "new_tokens": 64},
}
"""Default prompt length (the longest; rows vary down to half) and new tokens per model.
The tiny models hold 128 positions."""


# -- the child process: one (model, batch, variant) ------------------------------------------


def _load(model: str):
    """``(adapter, vocab)``: the project's adapter of ``model`` (from whichever checkout is first on sys.path)."""
    import torch

    from nemo_guide.backends.torch.models import HFAdapter, load_adapter

    if model == "smollm2-135m":
        from types import SimpleNamespace

        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        net = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
        tokenizer = SimpleNamespace(
            eos_token_id=SMOLLM2_135M["eos_token_id"],
            pad_token_id=SMOLLM2_135M["pad_token_id"],
        )
        return HFAdapter(
            net, tokenizer, "SmolLM2-135M architecture, random weights"
        ), SMOLLM2_135M["vocab_size"]
    adapter = load_adapter(f"builtin:{model}", torch.float32, torch.device("cpu"))
    adapter.model.eval()
    vocab = (
        adapter.model.config.vocab_size
        if hasattr(adapter.model, "config")
        else adapter.model.cfg.vocab_size
    )
    return adapter, vocab


def _prompts(batch: int, longest: int, vocab: int) -> list[list[int]]:
    """Seeded prompts of ``longest // 2 .. longest`` tokens, none of them a special id (0-2), the
    same in every variant."""
    import random

    rng = random.Random(1234 + batch)
    return [
        [
            rng.randrange(3, vocab)
            for _ in range(rng.randint(max(1, longest // 2), longest))
        ]
        for _ in range(batch)
    ]


def run_one(
    model: str,
    batch: int,
    variant: str,
    new_tokens: int,
    prompt_tokens: int,
    sample: bool,
    repeats: int,
    threads: int,
) -> dict:
    import torch

    torch.set_num_threads(threads)
    adapter, vocab = _load(model)
    prompts = _prompts(batch, prompt_tokens, vocab)
    temperature = 1.0 if sample else 0.0

    if variant == "hf":
        from transformers import GenerationConfig

        from nemo_guide.backends.torch.sampling import left_pad

        ids, mask = left_pad(prompts, adapter.pad_id)
        sampling = (
            dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
            if sample
            else dict(do_sample=False)
        )

        def generate(count: int) -> list[list[int]]:
            config = GenerationConfig(
                max_new_tokens=count,
                eos_token_id=None,
                pad_token_id=adapter.pad_id,
                bos_token_id=None,
                **sampling,
            )
            torch.manual_seed(7)
            with torch.no_grad():
                out = adapter.model.generate(
                    input_ids=ids, attention_mask=mask.long(), generation_config=config
                )
            return out[:, ids.shape[1] :].tolist()
    else:
        from nemo_guide.backends.torch.sampling import generate as project_generate

        def generate(count: int) -> list[list[int]]:
            responses, _ = project_generate(
                adapter.step(adapter.model),
                prompts,
                pad_id=adapter.pad_id,
                eos_ids=[vocab],
                max_new_tokens=count,
                temperature=temperature,
                generator=torch.Generator().manual_seed(7),
            )
            return responses

    generate(4)  # warm-up: allocator, kernels, lazy imports
    walls, cpus, tokens = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = generate(new_tokens)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    if any(len(t) != new_tokens for t in tokens):
        raise RuntimeError(f"{variant}: a response is not {new_tokens} tokens long")
    import nemo_guide

    digest = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:12]
    return {
        "checkout": str(Path(nemo_guide.__file__).resolve().parents[1]),
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "tokens": batch * new_tokens,
        "digest": digest,
    }


# -- the parent: rounds of interleaved subprocesses, one table -------------------------------


def _child(spec: dict, before: str | None, threads: int) -> dict | None:
    """Run one spec in a fresh interpreter whose ``nemo_guide`` comes from this checkout or ``before``."""
    return run_child(__file__, spec, before if spec["variant"] == "before" else str(REPO), threads)


def _variants(model: str, before: str | None) -> list[str]:
    return [
        "project",
        *(["before"] if before else []),
        *(["hf"] if model != "tiny" else []),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS)
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--new-tokens",
        type=int,
        help="tokens per response (default: per model, see MODELS)",
    )
    parser.add_argument(
        "--prompt-tokens", type=int, help="longest prompt (default: per model)"
    )
    parser.add_argument(
        "--sample",
        action="store_true",
        help="temperature-1 sampling from a fixed seed (default: greedy)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="tokens/s from wall-clock or process CPU time (cpu: steadier on a shared machine)",
    )
    add_benchmark_arguments(parser, repeats_help="timed generations per subprocess (median)", before_help="another checkout (e.g. main) measured as the 'before' variant")
    args = parse_or_run_child(parser, run_one)
    if args is None:
        return
    configs = [(m, b) for m in args.models for b in args.batches]
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for model, batch in configs:
            variants = _variants(model, args.before)
            shift = r % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                spec = dict(
                    model=model,
                    batch=batch,
                    variant=variant,
                    sample=args.sample,
                    repeats=args.repeats,
                    threads=args.threads,
                    new_tokens=args.new_tokens or MODELS[model]["new_tokens"],
                    prompt_tokens=args.prompt_tokens or MODELS[model]["prompt_tokens"],
                )
                out = _child(spec, args.before, args.threads)
                if out is not None:
                    results.setdefault((model, batch, variant), []).append(out)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    _print(configs, results, args)


def _print(configs, results, args) -> None:
    import torch

    def tps(model, batch, variant):
        runs = results.get((model, batch, variant))
        return (
            statistics.median(run["tokens"] / run[f"{args.clock}_s"] for run in runs)
            if runs
            else None
        )

    def cell(x, fmt="{:.0f}"):
        return "-" if x is None else fmt.format(x)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    print(
        f"\ngeneration tokens/s ({args.clock} time, median of {args.rounds} interleaved rounds x median of {args.repeats}), "
        f"{'sampled' if args.sample else 'greedy'}, {args.threads} thread(s), torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at the end; same tokens: every variant's tokens equal (greedy; sampled "
        "draws differ between the project's generator and transformers')"
    )
    for variant in ("project", "before"):
        where = {
            run["checkout"]
            for (_, _, v), runs in results.items()
            if v == variant
            for run in runs
        }
        if where:
            print(f"{variant}: nemo_guide from {', '.join(sorted(where))}")
    cols = [
        "model",
        "batch",
        "project",
        *(["before"] if args.before else []),
        "hf",
        "project/hf",
        *(["project/before"] if args.before else []),
        "same tokens",
    ]
    rows = []
    for model, batch in configs:
        p, b, h = (tps(model, batch, v) for v in ("project", "before", "hf"))
        digests = {
            results[(model, batch, v)][0]["digest"]
            for v in _variants(model, args.before)
            if (model, batch, v) in results
        }
        row = [
            model,
            str(batch),
            cell(p),
            *([cell(b)] if args.before else []),
            cell(h),
            cell(ratio(p, h), "{:.2f}"),
            *([cell(ratio(p, b), "{:.2f}")] if args.before else []),
        ]
        row.append("yes" if len(digests) == 1 else ("no" if digests else "-"))
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
