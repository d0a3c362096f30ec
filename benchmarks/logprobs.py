"""Peak memory and time of token log-probs: naive ``log_softmax(h @ W.T).gather`` vs ``fused_logprobs``
(its torch path everywhere, its Triton kernels on CUDA; each named explicitly, never ``impl="auto"``).

This is the measurement that decides ``fused_logprobs``'s ``impl="auto"``: it stays on the
torch path until a CUDA run of this script shows the Triton column faster.

Forward + backward w.r.t. hidden and weight, float32 (CPU) or bfloat16 inputs (CUDA).
Each (config, variant) runs in a fresh subprocess; on CPU the peak is the process's
high-water RSS above what it held after building the inputs (VmHWM, reset through
/proc/self/clear_refs), on CUDA ``torch.cuda.max_memory_allocated`` above the inputs.
Prints one table with fused/naive ratios measured side by side in this run.

    python benchmarks/logprobs.py                        # the default grid (slow on CPU)
    python benchmarks/logprobs.py --tokens 2048 --hidden 896 --repeats 1
"""

from __future__ import annotations

import argparse
import json
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


def run_one(variant: str, tokens: int, hidden: int, vocab: int, repeats: int, device: str, chunk: int) -> dict:
    import torch

    from nemo_guide.kernels.logprobs import fused_logprobs

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h = (torch.randn(tokens, hidden, device=device, dtype=dtype) * 0.05).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.05).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,), device=device)

    def step():
        if variant == "naive":
            lp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        else:  # fused-torch | fused-triton
            lp = fused_logprobs(h, w, y, chunk_size=chunk, impl=variant.split("-", 1)[1])
        lp.sum().backward()
        h.grad = None
        w.grad = None

    times = []
    if device == "cuda":
        step()  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        peak_mb = (_rss_kb("VmHWM") - base) / 1024
    return {"peak_mb": peak_mb, "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 3584])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024, help="fused_logprobs chunk_size")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_one(**spec)))
        return
    rows = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            result = {}
            for variant in _variants(args.device):
                spec = dict(variant=variant, tokens=tokens, hidden=hidden, vocab=args.vocab, repeats=args.repeats, device=args.device, chunk=args.chunk)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
                if out.returncode != 0:
                    result[variant] = None
                    print(f"{variant} T={tokens} H={hidden} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                else:
                    result[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((tokens, hidden, result))
            _print(rows, args)


def _variants(device: str) -> tuple[str, ...]:
    """naive and the torch path everywhere; the Triton kernels on CUDA."""
    return ("naive", "fused-torch", "fused-triton") if device == "cuda" else ("naive", "fused-torch")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _print(rows, args) -> None:
    import platform

    import torch

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\nfused_logprobs vs naive, forward+backward, V={args.vocab}, chunk={args.chunk}, {args.device} ({where}), median of {args.repeats}")
    fused = _variants(args.device)[1:]
    head = "| T | H | naive peak MB | " + " | ".join(f"{v} peak MB (ratio)" for v in fused) + " | naive s | " + " | ".join(f"{v} s (ratio)" for v in fused) + " |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(fused) + 1))
    for tokens, hidden, r in rows:
        n = r.get("naive")
        cells = [str(tokens), str(hidden), f"{n['peak_mb']:.0f}" if n else "failed"]
        for v in fused:
            f = r.get(v)
            cells.append(f"{f['peak_mb']:.0f} ({f['peak_mb'] / max(n['peak_mb'], 1e-9):.3f})" if f and n else (f"{f['peak_mb']:.0f}" if f else "failed"))
        cells.append(f"{n['median_s']:.2f}" if n else "-")
        for v in fused:
            f = r.get(v)
            cells.append(f"{f['median_s']:.2f} ({f['median_s'] / n['median_s']:.2f})" if f and n else (f"{f['median_s']:.2f}" if f else "failed"))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
