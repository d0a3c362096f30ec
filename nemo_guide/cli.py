"""The ``nemo-guide`` command line. Entry points pick a backend; nothing below them does."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _load(args: argparse.Namespace):
    from nemo_guide.config import load_config

    return load_config(args.config, list(args.overrides))


def make_backend(cfg):
    """The configured :class:`~nemo_guide.backends.base.PolicyBackend`."""
    if cfg.backend.name == "torch":
        from nemo_guide.backends.torch.backend import TorchBackend

        if cfg.backend.model.startswith("builtin:"):
            _builtin_weights(cfg.backend.model)  # an unknown name is the user's mistake, said in one line

        return TorchBackend(cfg.backend, cfg.optim, temperature=cfg.generation.temperature, seed=cfg.run.seed)
    from nemo_guide.errors import RunError

    raise RunError(
        "backend.name=megatron: `nemo-guide train` runs the embedded torch backend only. Megatron-scale training runs "
        "through the NeMo-Aligner plugin: `python -m nemo_guide.aligner.train --config-path conf/aligner --config-name <name>` "
        "(README, 'The NeMo-Aligner plugin'). Use backend.name=torch here"
    )


THREADS_HELP = (
    "torch CPU threads: N, or auto (default): 1 when the policy runs on CPU (backend.device cpu, or auto without CUDA), "
    "else torch's default; OMP_NUM_THREADS, when set, is kept. More threads help only on an otherwise idle machine"
)


def _at_least_one(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number >= 1")
    return int(value)


def _threads(value: str) -> int | str:
    return value if value == "auto" else _at_least_one(value)


def apply_threads(requested: int | str, device: str) -> int:
    """Set torch's intra-op thread count for a command that computes with torch; returns it.

    ``auto`` does not fall into the trap of torch's default on a busy machine: on CPU every
    thread of an OpenMP region waits at a barrier for the slowest, so one descheduled thread
    stalls them all (issue 11: steps 21x slower with torch's 2 threads on 2 busy cores). It picks 1 thread when the policy runs on CPU, torch's default on a GPU, and keeps
    an explicit ``OMP_NUM_THREADS``. The choice is logged once, to stderr.

    Raises:
        RunError: ``device`` asks for CUDA and none is visible.
    """
    import os

    import torch

    from nemo_guide.errors import RunError

    cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise RunError(f"backend.device = {device!r} but no CUDA device is visible; use backend.device=cpu or auto")
    on_cpu = device == "cpu" or (device == "auto" and not cuda)
    if requested != "auto":
        count, why = int(requested), "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        count, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    elif on_cpu:
        count, why = 1, "--threads auto: the policy runs on CPU"
    else:
        count, why = torch.get_num_threads(), "--threads auto: torch's default, the policy runs on the GPU"
    torch.set_num_threads(count)
    print(f"torch threads: {count} ({why}); more help only on an otherwise idle machine (--threads N)", file=sys.stderr)
    return count


def _split_checkpoint(overrides: list[str]) -> tuple[list[str], str | None]:
    ckpts = [item.split("=", 1)[1] for item in overrides if item.startswith("checkpoint=")]
    return [item for item in overrides if not item.startswith("checkpoint=")], (ckpts[-1] if ckpts else None)


def _cmd_config(args: argparse.Namespace) -> int:
    from nemo_guide.commands.plan import is_aligner_config, run_aligner_config

    if is_aligner_config(args.config):  # conf/aligner/*.yaml: the plugin's checks
        return run_aligner_config(args)
    cfg = _load(args)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from nemo_guide.loop import train

    cfg = _load(args)
    apply_threads(args.threads, cfg.backend.device)
    backend = make_backend(cfg)
    summary = train(cfg, backend, progress=not args.no_progress)
    keys = ("steps", "wall_seconds", "train_reward_first", "train_reward_last", "eval_before", "eval_after")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def _builtin_weights(model: str) -> Path:
    """The packaged weights file (or Hugging Face directory) of ``builtin:<name>``."""
    from nemo_guide.backends.torch.models import builtin_path

    return builtin_path(model)


def _cmd_eval(args: argparse.Namespace) -> int:
    from nemo_guide.errors import RunError
    from nemo_guide.eval_report import report, write_results
    from nemo_guide.evaluation import SamplingSpec, eval_reward, evaluate_benchmarks, load_benchmarks, read_samples
    from nemo_guide.prompts import PromptSettings
    from nemo_guide.rewards import make_reward
    from nemo_guide.samples import SAMPLES_FILE, check_reuse, model_source

    ks = sorted(set(args.k if args.k is not None else [1] if args.n else []))
    if args.n < 0:
        raise RunError(f"--n {args.n}: give the number of samples per problem besides the greedy answer (0 or more)")
    if any(k < 1 or k > args.n for k in ks):
        raise RunError(f"--k {' '.join(map(str, ks))} with --n {args.n}: pass@k needs k samples per problem (1 <= k <= n); raise --n to {max(ks)} or drop the larger k")
    args.overrides, ckpt = _split_checkpoint(list(args.overrides))
    cfg = _load(args)
    benchmarks = load_benchmarks(args.benchmark or [], cfg.data.train, cfg.data.eval, args.limit if args.limit is not None else cfg.data.eval_limit)
    spec = SamplingSpec(
        n=args.n, temperature=args.temperature if args.temperature is not None else cfg.generation.temperature,
        top_p=cfg.generation.top_p, with_hints=args.with_hints, seed=cfg.run.seed,
    )
    builtin = _builtin_weights(cfg.backend.model) if cfg.backend.model.startswith("builtin:") else None
    source = model_source(cfg.backend.model, ckpt, builtin, spec.temperature, spec.top_p, cfg.generation.max_new_tokens, spec.seed)
    out_dir = Path(args.out) if args.out else (Path(ckpt) / "eval" if ckpt else cfg.run.run_dir / "eval")
    if not args.fresh:  # refuse another model's samples before loading this one (prompts are checked later)
        check_reuse(out_dir / SAMPLES_FILE, read_samples(out_dir / SAMPLES_FILE), source, {})
    apply_threads(args.threads, cfg.backend.device)
    backend = make_backend(cfg)
    if ckpt is not None:
        backend.load_weights(Path(ckpt))
    reward_name = args.reward or eval_reward(args.benchmark or [], cfg.data.reward, cfg.data.train)
    reward_fn = make_reward(reward_name, num_workers=cfg.data.reward_workers)
    try:
        path = evaluate_benchmarks(
            backend, backend, benchmarks, reward_fn, spec, PromptSettings.from_config(cfg), out_dir,
            source=source, fresh=args.fresh, batch_size=args.batch_size, progress=not args.no_progress,
        )
    finally:
        reward_fn.close()
    ids = {(b.name, r.id) for b in benchmarks for r in b.records}
    rows = [r for r in read_samples(path) if (r["benchmark"], str(r["id"])) in ids]
    header = {
        **source.fields(), "n": spec.n, "with_hints": spec.with_hints, "reward": reward_name, "samples": str(path),
        "benchmarks": {b.name: {"source": b.source, "problems": len(b.records)} for b in benchmarks},
    }
    result, table = report(rows, ks, with_hints=args.with_hints, header=header)
    paths = write_results(out_dir, result, table)
    print(table)
    print(f"wrote {paths[0]}, {paths[1]}, {path}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from nemo_guide.analysis import analyze, markdown, write_report

    result = analyze(Path(args.before), Path(args.after), k=args.k, epsilon=args.epsilon, rounds=args.bootstrap, seed=args.seed)
    paths = write_report(result, Path(args.out))
    print(markdown(result))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _cmd_hints(args: argparse.Namespace) -> int:
    from nemo_guide.errors import RunError
    from nemo_guide.hintgen import HintClientConfig, run_hints

    try:
        cfg = HintClientConfig(
            base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
            max_retries=args.max_retries, timeout_s=args.timeout, temperature=args.temperature, on_leak=args.on_leak,
        )
    except ValueError as exc:  # its __post_init__ checks exactly these flags
        raise RunError(f"hints: {exc}") from exc
    counts = run_hints(Path(args.input), Path(args.output), cfg, progress=not args.no_progress)
    print(json.dumps(counts, indent=2))
    return 1 if counts["failed"] else 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from nemo_guide.prepare import prepare

    summary = prepare(Path(args.input), Path(args.output), id_field=args.id_field, workers=args.workers)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from nemo_guide.backends.torch.warmstart import ARCHS, REGIMES_ASSET, build_warmstart

    from nemo_guide.errors import RunError

    asset = REGIMES_ASSET if args.regimes else ARCHS[args.arch].asset
    if args.regimes and args.arch != "tiny" and args.overwrite_asset:
        raise RunError(f"warmstart --regimes --arch {args.arch} --overwrite-asset: only the tiny build is shipped (builtin:tiny-regimes); give --out DIR instead")
    if (args.out is None) == (not args.overwrite_asset):
        target = "FILE.safetensors (e.g. --out runs/warmstart.safetensors)" if args.arch == "tiny" else "DIR (e.g. --out runs/tiny_llama)"
        raise RunError(
            f"warmstart writes to --out {target}; --overwrite-asset replaces the packaged "
            f"builtin:{'tiny-regimes' if args.regimes else 'tiny' if args.arch == 'tiny' else 'tiny-llama'} policy {asset} instead. Give exactly one of them"
        )
    apply_threads(args.threads, "cpu")  # the warm start trains on CPU
    build_warmstart(args.out or asset, arch=args.arch, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, regimes=args.regimes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nemo_guide.backends.torch.warmstart import ARCHS
    from nemo_guide.commands import add_commands
    from nemo_guide.commands.convert import run_convert

    parser = argparse.ArgumentParser(prog="nemo-guide", description="Guide-GRPO: adaptive guidance for RL of reasoning LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> the command's parser

    p = sub.add_parser("config", help="validate a YAML config (with key=value overrides) and print it resolved")
    p.add_argument("config", help="path to a YAML config, e.g. conf/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm.group_size=4")
    p.set_defaults(func=_cmd_config, parser=p)

    p = sub.add_parser("train", help="train with the embedded backend (writes runs/<run.name>/)")
    p.add_argument("config", help="path to a YAML config, e.g. conf/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=10 algorithm.mode=grpo")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--threads", type=_threads, default="auto", help=THREADS_HELP)
    p.set_defaults(func=_cmd_train, parser=p)

    p = sub.add_parser("eval", help="pass@1 / pass@k on benchmarks (or the held-out set) of a checkpoint or backend.model")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("overrides", nargs="*", help="checkpoint=runs/<name>/checkpoints/step_000120 and key=value overrides")
    p.add_argument("--benchmark", action="append", metavar="[NAME=]FILE", help="a JSONL/Parquet file (id, problem, answer); repeatable. Default: the config's held-out set")
    p.add_argument("--n", type=int, default=4, help="samples per problem at --temperature, besides the greedy answer (default 4)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: generation.temperature)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="pass@k to report (1 <= k <= n), e.g. --k 1 4 8 (default 1)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark (default: data.eval_limit)")
    p.add_argument("--with-hints", action="store_true", help="also evaluate hinted prompts of records with a hint (Figure 2)")
    p.add_argument("--reward", choices=["math", "exact"], default=None, help="verifier (default: the config's data.reward)")
    p.add_argument("--out", default=None, help="output directory (default: <checkpoint>/eval or runs/<name>/eval)")
    p.add_argument("--fresh", action="store_true", help="start over: move samples.jsonl aside (samples.jsonl.old-<timestamp>) instead of resuming it")
    p.add_argument("--batch-size", type=_at_least_one, default=64, help="prompts per generate call; each batch is written as soon as it is scored")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a log line to stderr every 10%% or 30 s")
    p.add_argument("--threads", type=_threads, default="auto", help=THREADS_HELP)
    p.set_defaults(func=_cmd_eval, parser=p)

    p = sub.add_parser("analyze", help="self-distillation vs capability gain (Eq. 1-2) from two eval sample files")
    p.add_argument("before", help="samples.jsonl of the initial policy (nemo-guide eval; --with-hints for Figure 2)")
    p.add_argument("after", help="samples.jsonl of the trained policy")
    p.add_argument("--k", type=int, default=8, help="effective k: the training group size (default 8)")
    p.add_argument("--epsilon", type=float, default=0.01, help="relative pass@k gain below which k_abs is reached (Appendix C)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the curves' 95%% bands")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")
    p.set_defaults(func=_cmd_analyze, parser=p)

    p = sub.add_parser("hints", help="generate hints from reference solutions (Appendix G) via a chat-completions API")
    p.add_argument("input", help="records with 'solution' (JSONL/Parquet)")
    p.add_argument("output", help="JSONL of records with 'hint', appended as they finish (rerun to resume)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key (never logged)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--on-leak", choices=["flag", "reject"], default="flag", help="a reply stating the final answer: keep it flagged, or reject it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_hints, parser=p)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("prepare", help="OpenR1-Math-style rows (problem, solution, answer) to records; drops (and lists) unusable answers")
    q.add_argument("input", help=".jsonl or .parquet")
    q.add_argument("output", help="records JSONL; dropped rows go to OUTPUT.dropped.jsonl")
    q.add_argument("--id-field", default="uuid", help="row field used as the record id (default uuid; else id; else <stem>-<row>)")
    q.add_argument("--workers", type=int, default=2, help="verifier processes")
    q.set_defaults(func=_cmd_data_prepare, parser=q)

    p = sub.add_parser("convert", help="Hugging Face (Qwen2/Llama) <-> Megatron-core distributed checkpoint or NeMo 2.1 .nemo file (needs the megatron extra)")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf", "hf-to-nemo", "nemo-to-hf"])
    p.add_argument("input", help="a Hugging Face model directory, a distributed checkpoint directory or a .nemo file")
    p.add_argument("output", help="a new directory or .nemo file (never overwritten)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=None,
                   help="weight dtype written (default: bfloat16 for the Megatron directions; auto, the stored dtype, for the .nemo ones)")
    p.add_argument("--hf-config", default=None, help="megatron-to-hf / nemo-to-hf: the model's config.json, if the checkpoint holds none")
    p.add_argument("--tokenizer", default=None, help="hf-to-nemo: the tokenizer NeMo loads (model_config.yaml tokenizer.type): a directory or Hub name (default: the input directory, absolute)")
    p.add_argument("--threads", type=_threads, default="auto", help=THREADS_HELP)
    p.set_defaults(func=run_convert, parser=p)

    p = sub.add_parser("warmstart", help="build a built-in policy by SFT on the digit-ops task (builtin:tiny; builtin:tiny-llama with --arch llama)")
    p.add_argument("--arch", choices=list(ARCHS), default="tiny", help="tiny: the character-level decoder, one .safetensors file (default); llama: a Hugging Face LlamaForCausalLM directory")
    p.add_argument("--out", default=None, help="output .safetensors file (tiny) or directory (llama); required unless --overwrite-asset")
    p.add_argument("--overwrite-asset", action="store_true", help="replace the packaged asset of --arch (nemo_guide/assets/) instead of --out")
    shipped = "default: the shipped build's (" + "; ".join(f"{a} %s" for a in ARCHS) + ")"
    p.add_argument("--steps", type=int, default=None, help=shipped % tuple(d.steps for d in ARCHS.values()))
    p.add_argument("--batch-size", type=int, default=None, help=shipped % tuple(d.batch_size for d in ARCHS.values()))
    p.add_argument("--lr", type=float, default=None, help=shipped % tuple(d.lr for d in ARCHS.values()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regimes", action="store_true",
                   help="SFT on the regimes mixture: adds the operators $ ! ? (seen unhinted with a fixed wrong meaning, "
                        "the right one in 5%% / 25%% / 0%% of their examples); --overwrite-asset then replaces builtin:tiny-regimes")
    p.add_argument("--threads", type=_threads, default="auto", help=THREADS_HELP)
    p.set_defaults(func=_cmd_warmstart, parser=p)
    add_commands(sub)  # plan, doctor
    return parser


FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError, UnicodeDecodeError)
"""File errors a user causes (a wrong path, a file in the way, a file not in UTF-8)."""


def user_errors() -> tuple[type[Exception], ...]:
    """What the CLI reports in one line with exit code 2 (STYLE point 21): the project's own
    error types (:class:`ConfigError`, :class:`DataError` and its :class:`JsonlError`,
    :class:`RunError`, :class:`ConvertError`) and :data:`FILE_ERRORS`. Anything else is a bug and
    keeps its traceback."""
    from nemo_guide.config import ConfigError
    from nemo_guide.convert.errors import ConvertError
    from nemo_guide.data.errors import DataError
    from nemo_guide.errors import RunError

    return (ConfigError, ConvertError, DataError, RunError, *FILE_ERRORS)


OVERRIDE_COMMANDS = ("config", "train", "eval", "plan")
KEY_VALUE = re.compile(r"\+?[A-Za-z_][\w.]*=")


def _pull_overrides(command: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv without the key=value overrides, the overrides in order)``; the value of an
    option taking one value (``--benchmark NAME=FILE``) stays with its option."""
    single = {s for action in command._actions for s in action.option_strings if action.nargs is None}
    kept, pulled, i = argv[:1], [], 1
    while i < len(argv):
        if argv[i] in single:
            kept += argv[i : i + 2]
            i += 2
            continue
        (pulled if KEY_VALUE.match(argv[i]) else kept).append(argv[i])
        i += 1
    return kept, pulled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. ``key=value`` overrides may come before, between or after flags
    (``train conf/x.yaml --no-progress run.steps=2``, ``eval conf/x.yaml --k 1 4 checkpoint=DIR``)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pulled: list[str] = []
    if argv and argv[0] in OVERRIDE_COMMANDS:
        argv, pulled = _pull_overrides(parser.commands[argv[0]], argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the usage of the command, not the top-level one
        args.parser.error("unrecognized arguments: " + " ".join(unknown))
    if pulled:
        args.overrides = [*args.overrides, *pulled]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
