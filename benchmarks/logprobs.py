"""Peak memory and time of token log-probs, forward + backward w.r.t. hidden states and weight:
naive ``log_softmax(h @ W.T).gather``, megatron-core's ``vocab_parallel_cross_entropy`` (negated:
it returns ``-log p``) and ``fused_logprobs`` (its torch path everywhere, its Triton kernels on
CUDA; each named explicitly, never ``impl="auto"``).

This is the measurement that decides ``fused_logprobs``'s ``impl="auto"``: it stays on the
torch path until a CUDA run of this script shows the Triton column faster.

Float32 inputs on CPU, bfloat16 on CUDA. megatron-core runs in one process: a world of one
(gloo on CPU, NCCL on CUDA) and its model-parallel groups of size 1; its logits ``h @ W.T``
are built by autograd as in a model's output layer and go in as ``[T, 1, V]``.

How it measures: each (config, variant) runs in a fresh subprocess; variants are interleaved
round by round (round ``r`` starts with variant ``r mod n``), and each figure is the median
over ``--rounds`` rounds (each round: the median of ``--repeats`` steps after a small warm-up
step that loads the kernels without touching the big buffers). On CPU the peak is the
process's high-water RSS above what it held after building the inputs (VmHWM, reset through
/proc/self/clear_refs), on CUDA ``torch.cuda.max_memory_allocated`` above the inputs. Every
variant returns the weight gradient (``V x H`` in the weight's dtype: 4 bytes an element on
CPU), so the table shows the peak with it and without it (``peak - dW``: the working memory
the method itself needs). One table at the end: each variant's time and peaks, and their
ratios to megatron-core and to naive measured side by side in this run.

    python benchmarks/logprobs.py                        # the default grid (slow on CPU)
    python benchmarks/logprobs.py --tokens 1024 2048 4096 --hidden 896 --threads 2 --rounds 3
    python benchmarks/logprobs.py --tokens 256 --vocab 32000 --hidden 256 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _start_megatron(device: str) -> None:
    """A one-process world and megatron-core's model-parallel groups (all of size 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1, store=dist.HashStore())
    parallel_state.initialize_model_parallel(1, 1)


def run_one(variant: str, tokens: int, hidden: int, vocab: int, repeats: int, device: str, chunk: int | None, budget_mb: int, threads: int | None) -> dict:
    import torch

    from nemo_guide.kernels.chunking import chunk_rows
    from nemo_guide.kernels.logprobs import _compute_dtype, fused_logprobs

    if threads:
        torch.set_num_threads(threads)
    if variant == "megatron":
        _start_megatron(device)
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    budget = budget_mb * 2**20

    def logprobs(h, w, y):
        if variant == "naive":
            return torch.log_softmax((h @ w.T).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if variant == "megatron":
            return -vocab_parallel_cross_entropy((h @ w.T).unsqueeze(1), y.unsqueeze(1)).squeeze(1)  # [T, 1, V] in
        if variant == "fused-recompute":  # the op before it kept a chunk: every chunk's logits recomputed in backward
            return fused_logprobs(h, w, y, chunk_size=chunk, memory_budget=budget, impl="torch", recompute=True)
        return fused_logprobs(h, w, y, chunk_size=chunk, memory_budget=budget, impl=variant.split("-", 1)[1])  # fused-torch | fused-triton

    def step(h, w, y):
        logprobs(h, w, y).sum().backward()
        h.grad = None
        w.grad = None

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h = (torch.randn(tokens, hidden, device=device, dtype=dtype) * 0.05).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.05).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,), device=device)
    small_v = min(vocab, 4096)  # warm-up: the same code on a small slice
    step(h[:16].detach().clone().requires_grad_(True), w[:small_v].detach().clone().requires_grad_(True), y[:16] % small_v)

    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            t = time.perf_counter()
            step(h, w, y)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        for _ in range(repeats):
            t = time.perf_counter()
            step(h, w, y)
            times.append(time.perf_counter() - t)
        peak_mb = (_rss_kb("VmHWM") - base) / 1024
    used = chunk_rows(tokens, chunk, vocab, _compute_dtype(h, w), budget) if variant.startswith("fused") else None
    return {"peak_mb": peak_mb, "s": statistics.median(times), "dw_mb": w.numel() * w.element_size() / 2**20, "chunk": used, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 3584])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per round (their median is the round's time)")
    parser.add_argument("--chunk", type=int, default=None, help="fused_logprobs chunk_size (default: None, chosen from --budget-mb)")
    parser.add_argument("--budget-mb", type=int, default=512, help="fused_logprobs memory_budget in MiB when --chunk is not given")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every subprocess (default: torch's own)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(**json.loads(args.child))))
        return
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")
    variants = _variants(args.device)
    if "megatron" not in variants:
        print("megatron-core is not installed (pip install -e '.[megatron]'): no megatron column", file=sys.stderr)
    load_before = os.getloadavg()
    rows = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for r in range(args.rounds):
                for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
                    spec = dict(variant=variant, tokens=tokens, hidden=hidden, vocab=args.vocab, repeats=args.repeats, device=args.device,
                                chunk=args.chunk, budget_mb=args.budget_mb, threads=args.threads)
                    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"round {r + 1}: {variant} T={tokens} H={hidden} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                        continue
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    runs[variant].append(res)
                    print(f"round {r + 1}: {variant:12s} T={tokens} H={hidden}: {res['s']:.3f} s, peak {res['peak_mb']:.0f} MB", file=sys.stderr)
            rows.append((tokens, hidden, {v: _summary(rs) for v, rs in runs.items()}))
    _print(rows, variants, args, load_before, os.getloadavg())


def _summary(runs: list[dict]) -> dict | None:
    """Medians over rounds (and the time's range); None if no round succeeded."""
    if not runs:
        return None
    times = [r["s"] for r in runs]
    return {"s": statistics.median(times), "s_min": min(times), "s_max": max(times), "peak_mb": statistics.median(r["peak_mb"] for r in runs),
            "dw_mb": runs[0]["dw_mb"], "chunk": runs[0]["chunk"], "threads": runs[0]["threads"], "rounds": len(runs)}


def _variants(device: str) -> list[str]:
    """naive, megatron-core (when installed), the torch path and its recompute-every-chunk form (the op
    before it kept a chunk) everywhere; the Triton kernels on CUDA."""
    out = ["naive"] + (["megatron"] if importlib.util.find_spec("megatron") and importlib.util.find_spec("megatron.core") else []) + ["fused-torch", "fused-recompute"]
    return out + (["fused-triton"] if device == "cuda" else [])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


def _print(rows, variants, args, load_before, load_after) -> None:
    import platform

    import torch

    threads = next((s["threads"] for _, _, r in rows for s in r.values() if s), None)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {threads} threads"
    chunk = f"chunk_size={args.chunk}" if args.chunk else f"chunk from a {args.budget_mb} MiB budget"
    print(f"\nlog-probs forward+backward, V={args.vocab}, {args.device} ({where}), fused {chunk}; "
          f"median of {args.rounds} interleaved rounds x {args.repeats} repeats; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("peak: high-water mark above the inputs; peak - dW: without the V x H weight gradient every variant returns; "
          "ratios: this variant / megatron-core, / naive")
    print("| T | H | variant | chunk | s (min-max) | peak MB | peak - dW MB | s / mcore | peak / mcore | (peak - dW) / mcore | s / naive | peak / naive | (peak - dW) / naive |")
    print("|" + "---|" * 13)
    for tokens, hidden, r in rows:
        mc, nv = r.get("megatron"), r.get("naive")
        for v in variants:
            x = r.get(v)
            if x is None:
                print(f"| {tokens} | {hidden} | {v} | failed |" + " |" * 9)
                continue
            ex = x["peak_mb"] - x["dw_mb"]
            cells = [str(tokens), str(hidden), v, str(x["chunk"] or "-"), f"{x['s']:.3f} ({x['s_min']:.3f}-{x['s_max']:.3f})", f"{x['peak_mb']:.0f}", f"{ex:.0f}"]
            for ref in (mc, nv):
                cells += [_ratio(x["s"], ref and ref["s"]), _ratio(x["peak_mb"], ref and ref["peak_mb"]), _ratio(ex, ref and ref["peak_mb"] - ref["dw_mb"])]
            print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
