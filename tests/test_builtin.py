"""The embedded default: the shipped warm-start policy and the command that builds it."""

import json

import pytest
import torch

from nemo_guide.backends.torch.models import builtin_path, load_adapter
from nemo_guide.backends.torch.tiny import TinyConfig, load_tiny
from nemo_guide.backends.torch.warmstart import ASSET, REGIMES_ASSET, build_warmstart, probe_accuracy
from nemo_guide.cli import main
from nemo_guide.data import digit_ops
from nemo_guide.errors import RunError


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
    assert "regimes" not in build and "regime_ops" not in build  # the default record is as before the knob


def test_warmstart_is_seeded(tmp_path):
    a = build_warmstart(tmp_path / "a.safetensors", steps=2, batch_size=4, probe=False, log=lambda s: None)
    b = build_warmstart(tmp_path / "b.safetensors", steps=2, batch_size=4, probe=False, log=lambda s: None)
    assert a["final_loss"] == b["final_loss"]
    assert a["probe_accuracy"] is None and a["probe"].startswith("skipped")
    assert json.loads(load_tiny(tmp_path / "a.safetensors")[1]["build"])["probe"] == a["probe"]  # the file says so too
    ma, _ = load_tiny(tmp_path / "a.safetensors")
    mb, _ = load_tiny(tmp_path / "b.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True))


def test_shipped_regimes_asset_is_current():
    assert builtin_path("tiny-regimes") == REGIMES_ASSET
    model, meta = load_tiny(REGIMES_ASSET)
    assert meta["task_version"] == str(digit_ops.TASK_VERSION), "rebuild with `nemo-guide warmstart --regimes --overwrite-asset`"
    assert TinyConfig.from_json(meta["tiny_config"]) == TinyConfig()
    build = json.loads(meta["build"])
    assert build["command"] == f"nemo-guide warmstart --regimes --steps {build['steps']} --batch-size 64 --lr 0.002 --seed 0"
    assert build["regimes"] is True
    assert build["regime_ops"] == {
        op: {"definition": list(digit_ops.DEFINITIONS[op]), "shown_instead": list(digit_ops.RARE_WRONG[op]), "p": p} for op, p in digit_ops.RARE_P.items()
    }
    acc = build["probe_accuracy"]
    assert set(acc) == {"known", "novel_hinted", "unseen_hinted", "novel", "unseen", "rare_hinted", "rare", "wrong_hinted", "wrong"}
    assert acc["known"] >= 0.95 and min(acc[k] for k in acc if k.endswith("_hinted")) >= 0.95  # follows hints
    # Greedy fails every other level without the hint. (The probe's operands are any pairs, some
    # of which several definitions answer alike, so a wrong definition can score: hence not 0.)
    assert max(acc["novel"], acc["unseen"], acc["rare"], acc["wrong"]) <= 0.25
    assert load_adapter("builtin:tiny-regimes", torch.float32, torch.device("cpu")).source == "builtin:tiny-regimes"


def test_shipped_regimes_probe_matches_its_record():
    model, meta = load_tiny(REGIMES_ASSET)
    recorded = json.loads(meta["build"])["probe_accuracy"]
    # Greedy decoding of the same 9 x 64 problems (measured equal at one and two threads).
    assert probe_accuracy(model, regimes=True) == recorded


def test_warmstart_regimes_flag(tmp_path, capsys):
    out = tmp_path / "reg.safetensors"
    assert main(["warmstart", "--regimes", "--out", str(out), "--steps", "2", "--batch-size", "8"]) == 0
    build = json.loads(load_tiny(out)[1]["build"])
    assert build["command"] == "nemo-guide warmstart --regimes --steps 2 --batch-size 8 --lr 0.002 --seed 0"
    assert build["regimes"] is True and set(build["regime_ops"]) == set("$!?")
    assert set(build["probe_accuracy"]) == {"known", "novel_hinted", "unseen_hinted", "novel", "unseen", "rare_hinted", "rare", "wrong_hinted", "wrong"}
    # The knob changes the data (so the weights) from the first step, nothing else.
    a = build_warmstart(tmp_path / "a.safetensors", steps=1, batch_size=8, probe=False, log=lambda s: None)
    b = build_warmstart(tmp_path / "b.safetensors", steps=1, batch_size=8, probe=False, regimes=True, log=lambda s: None)
    assert a["final_loss"] != b["final_loss"]
    capsys.readouterr()
    assert main(["warmstart", "--regimes", "--arch", "llama", "--overwrite-asset"]) == 2
    assert "only the tiny build is shipped" in capsys.readouterr().err
    assert main(["warmstart", "--regimes"]) == 2
    assert "--overwrite-asset replaces the packaged builtin:tiny-regimes policy" in capsys.readouterr().err
    with pytest.raises(RunError, match="give --out"):
        build_warmstart(arch="llama", regimes=True, steps=1, probe=False)
