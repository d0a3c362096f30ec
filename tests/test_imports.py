"""The import boundaries of DESIGN section 2."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_guide"
HEAVY = ["transformers", "megatron", "nemo", "nemo_aligner", "tensorrt_llm", "transformer_engine", "apex"]


@pytest.mark.parametrize("module", ["nemo_guide.core", "nemo_guide.rewards", "nemo_guide.data", "nemo_guide.config", "nemo_guide.aligner.config"])
def test_light_modules_pull_in_nothing_heavy(module):
    code = (
        f"import sys, {module}\n"
        f"heavy = {HEAVY!r}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
        "assert not __import__('torch').distributed.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


# What each layer may import from the package (imports point down only).
ALLOWED = {
    "core": {"nemo_guide.core"},
    "rewards": {"nemo_guide.rewards"},
    "data": {"nemo_guide.data", "nemo_guide.core"},
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_downwards_only(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        for name in _imports(path):
            if name.startswith("nemo_guide."):
                assert any(name == a or name.startswith(a + ".") for a in ALLOWED[layer]), f"{path}: imports {name}"
            assert name.split(".")[0] not in HEAVY, f"{path}: imports {name}"


def _package_imports(path: Path) -> set[str]:
    return {n for n in _imports(path) if n.startswith("nemo_guide")}


def test_backends_do_not_import_the_loop_or_entry_points():
    for path in (PACKAGE / "backends").rglob("*.py"):
        for name in _package_imports(path):
            assert not name.startswith(("nemo_guide.loop", "nemo_guide.cli")), f"{path}: imports {name}"


def test_only_entry_points_pick_a_backend():
    # The loop sees the PolicyBackend protocol (backends.base), never a concrete backend; the
    # NeMo-Aligner host uses the Megatron pieces (layout, last-stage log-probs), never the torch backend.
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("backends", "commands") or rel.name == "cli.py":  # commands/: the CLI's subcommand bodies
            continue
        banned = ("nemo_guide.backends.torch",) if rel.parts[0] == "aligner" else ("nemo_guide.backends.torch", "nemo_guide.backends.megatron")
        for name in _package_imports(path):
            assert not name.startswith(banned), f"{path}: imports {name}"


def test_only_the_aligner_package_imports_nemo():
    """NeMo and NeMo-Aligner are imported in nemo_guide/aligner/ only, and importing the package
    (and its config validation and train script) needs neither."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        roots = {n.split(".")[0] for n in _imports(path)}
        if rel.parts[0] != "aligner":
            assert not roots & {"nemo", "nemo_aligner"}, f"{rel} imports NeMo"
    code = (
        "import sys, nemo_guide, nemo_guide.aligner, nemo_guide.aligner.config, nemo_guide.aligner.train\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('nemo', 'nemo_aligner', 'megatron'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_convert_is_pure_tensor_code():
    """convert/ maps weights with torch + safetensors only (no transformers, no Megatron)."""
    code = (
        "import sys, nemo_guide.convert\n"
        f"heavy = {HEAVY!r}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in (PACKAGE / "convert").rglob("*.py"):
        for name in _package_imports(path):
            assert name.startswith("nemo_guide.convert"), f"{path}: imports {name}"


def test_megatron_triton_and_transformers_are_imported_in_one_guarded_place_each():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        roots = {n.split(".")[0] for n in _imports(path)}
        if "megatron" in roots:  # the NeMo-Aligner host runs only where the pinned stack is installed
            assert rel == "backends/megatron/_mcore.py" or rel.startswith("aligner/"), f"{rel} imports megatron"
        if roots & {"transformers", "tokenizers"}:  # the plugin reads the checkpoint's tokenizer before building NeMo
            assert rel in ("backends/torch/_hf.py", "aligner/train.py"), f"{rel} imports transformers or tokenizers"
        if "triton" in roots:
            assert rel == "kernels/logprobs_triton.py", f"{rel} imports triton"
    # the fused log-prob op does not pull triton in on CPU
    code = "import sys, torch\nfrom nemo_guide.kernels.logprobs import fused_logprobs\nfused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))\nassert 'triton' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)



HOSTS = ("loop.py", "steps.py", "prompts.py", "evaluation.py", "cli.py")


@pytest.mark.parametrize("module", HOSTS)
def test_hosts_use_the_protocols_without_probing(module):
    """The loop, the named steps, evaluation and the CLI call backends through the protocols of
    backends/base.py: a getattr/hasattr call there means a member the protocols do not declare."""
    tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
    probes = [
        f"{module}:{node.lineno}: {node.func.id}(...)"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
    ]
    assert not probes, probes


MAX_MODULE_LINES = 400
MAX_TRAIN_LINES = 80


def test_modules_stay_small_and_the_loop_reads_top_to_bottom():
    """STYLE points 12-13: no module over 400 lines; ``loop.train`` (which composes the named
    steps) under 80 lines."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, long
    tree = ast.parse((PACKAGE / "loop.py").read_text(encoding="utf-8"))
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= MAX_TRAIN_LINES
