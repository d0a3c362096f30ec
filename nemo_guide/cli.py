"""The ``nemo-guide`` command line. Entry points pick a backend; nothing below them does."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_config(args: argparse.Namespace) -> int:
    from nemo_guide.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-guide", description="Guide-GRPO: adaptive guidance for RL of reasoning LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="validate a YAML config (with key=value overrides) and print it resolved")
    p.add_argument("config", help="path to a YAML config, e.g. conf/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm.group_size=4")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
