"""``nemo-guide doctor [--json] [--no-import] [--check-pins]``: the stack's versions and the usable
features (:mod:`nemo_guide.aligner.doctor`). Exit code 1 with ``--check-pins`` when a pinned
version differs; 0 otherwise (an unusable feature is information, not an error)."""

from __future__ import annotations

import argparse
import json


def run_doctor(args: argparse.Namespace) -> int:
    from nemo_guide.aligner.doctor import render, report

    rep = report(imports=not args.no_import)
    print(json.dumps(rep, indent=2) if args.json else render(rep))
    return 1 if args.check_pins and rep["pin_problems"] else 0
