"""The embedded default: the shipped warm-start policy and the command that builds it."""

import json

import torch

from nemo_guide.backends.torch.tiny import TinyConfig, load_tiny
from nemo_guide.backends.torch.warmstart import ASSET, build_warmstart, probe_accuracy
from nemo_guide.cli import main
from nemo_guide.data import digit_ops


def test_shipped_asset_is_current():
    model, meta = load_tiny(ASSET)
    assert meta["task_version"] == str(digit_ops.TASK_VERSION), "rebuild with `nemo-guide warmstart` (README)"
    assert TinyConfig.from_json(meta["tiny_config"]) == TinyConfig()
    build = json.loads(meta["build"])
    assert build["command"].startswith("nemo-guide warmstart")
    acc = build["probe_accuracy"]
    assert acc["known"] >= 0.95 and acc["novel_hinted"] >= 0.95 and acc["unseen_hinted"] >= 0.95


def test_shipped_policy_needs_the_hint_for_novel_operators():
    model, _ = load_tiny(ASSET)
    acc = probe_accuracy(model, n=24, seed=7)
    assert acc["known"] >= 0.9  # solved without hints
    assert acc["novel_hinted"] >= 0.9 and acc["unseen_hinted"] >= 0.9  # follows hints
    assert acc["novel"] <= 0.25 and acc["unseen"] <= 0.25  # but cannot solve them unhinted


def test_warmstart_command_builds_a_loadable_policy(tmp_path):
    out = tmp_path / "ws.safetensors"
    assert main(["warmstart", "--out", str(out), "--steps", "3", "--batch-size", "8"]) == 0
    model, meta = load_tiny(out)
    build = json.loads(meta["build"])
    assert build["steps"] == 3 and build["batch_size"] == 8
    assert build["command"] == "nemo-guide warmstart --steps 3 --batch-size 8 --lr 0.002 --seed 0"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the command always probes and records it (3 steps learn nothing: accuracies near 0)
    assert build["probe"].startswith("greedy accuracy on 64 fresh problems")
    assert set(build["probe_accuracy"]) == {"known", "novel_hinted", "unseen_hinted", "novel", "unseen"}
    assert all(0.0 <= v <= 1.0 for v in build["probe_accuracy"].values())


def test_warmstart_is_seeded(tmp_path):
    a = build_warmstart(tmp_path / "a.safetensors", steps=2, batch_size=4, probe=False, log=lambda s: None)
    b = build_warmstart(tmp_path / "b.safetensors", steps=2, batch_size=4, probe=False, log=lambda s: None)
    assert a["final_loss"] == b["final_loss"]
    assert a["probe_accuracy"] is None and a["probe"].startswith("skipped")
    assert json.loads(load_tiny(tmp_path / "a.safetensors")[1]["build"])["probe"] == a["probe"]  # the file says so too
    ma, _ = load_tiny(tmp_path / "a.safetensors")
    mb, _ = load_tiny(tmp_path / "b.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True))
