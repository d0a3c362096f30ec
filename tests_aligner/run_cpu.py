"""Run the NeMo-Aligner plugin on a CPU: the CPU patches of ``nemo_cpu.py``, then the train script.

Usage (what ``make aligner-demo`` runs):
    .venv-aligner/bin/python tests_aligner/run_cpu.py --config-path conf/aligner --config-name tiny_cpu [key=value ...]

The patches stay test-side (the package never patches NeMo or torch); on GPU machines run
``python -m nemo_guide.aligner.train`` with the same arguments instead.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nemo_cpu

nemo_cpu.install()
from nemo_guide.aligner.train import main

if __name__ == "__main__":
    main()
