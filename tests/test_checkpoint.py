"""Checkpoints on disk: what counts as complete, deletion that a kill cannot half-do, leftovers, corrupt files."""

import os
import random
import shutil

import pytest
import torch

import nemo_guide.checkpoint as checkpoint_module
from nemo_guide.checkpoint import (
    CorruptCheckpoint,
    leftovers,
    list_checkpoints,
    read_checkpoint,
    remove_leftovers,
    step_dir,
    write_checkpoint,
)


def _save(directory):
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "optimizer.pt").write_bytes(b"optimizer")


def _write(run_dir, step, keep=5):
    return write_checkpoint(run_dir, step, save_backend=_save, state={"step": step}, config={"run": {"steps": 9}}, keep=keep)


def test_only_complete_checkpoints_are_listed(tmp_path):
    _write(tmp_path, 1)
    root = tmp_path / "checkpoints"
    for name, with_state in [
        ("step_000002", False),  # no state.json (written last): never complete
        ("step_000003.tmp-123", True),  # an unfinished write
        ("step_000004.deleting-123", True),  # an unfinished deletion
        ("step_000005.corrupt", True),  # moved aside by the user
        ("step_x", True),
    ]:
        (root / name).mkdir()
        if with_state:
            (root / name / "state.json").write_text("{}")
    assert list_checkpoints(tmp_path) == [(1, step_dir(tmp_path, 1))]
    assert [p.name for p in leftovers(tmp_path)] == ["step_000003.tmp-123", "step_000004.deleting-123"]


def test_pruning_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    _write(tmp_path, 3, keep=2)  # the same step again replaces it
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3] and not leftovers(tmp_path)


def test_a_kill_while_pruning_leaves_complete_checkpoints_and_a_named_leftover(tmp_path, monkeypatch):
    _write(tmp_path, 1, keep=1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        # Delete the file that a plain rmtree of step_000001 could have deleted first, then die.
        (path / "state.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, 2, keep=1)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    # step_000001 was renamed before its deletion began: no half-deleted directory under a complete name.
    assert list_checkpoints(tmp_path) == [(2, step_dir(tmp_path, 2))]
    assert [p.name for p in leftovers(tmp_path)] == [f"step_000001.deleting-{os.getpid()}"]
    assert {p.name for p in step_dir(tmp_path, 2).iterdir()} == {"model.safetensors", "optimizer.pt", "rng.pt", "config.json", "state.json"}


def test_a_kill_while_writing_leaves_a_leftover_that_is_removed(tmp_path):
    _write(tmp_path, 1)

    def dies(directory):
        _save(directory)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 2, save_backend=dies, state={"step": 2}, config={}, keep=5)
    (tmp_path / f"config.json.tmp-{os.getpid()}").write_text("{")  # an atomic_write_text cut short
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    found = [p.name for p in leftovers(tmp_path)]
    assert found == [f"config.json.tmp-{os.getpid()}", f"step_000002.tmp-{os.getpid()}"]
    assert [p.name for p in remove_leftovers(tmp_path)] == found
    assert not leftovers(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_corrupt_checkpoint_file_is_named_with_the_checkpoint_to_use(tmp_path, damage):
    for step in (1, 2):
        _write(tmp_path, step)
    rng = step_dir(tmp_path, 2) / "rng.pt"
    data = rng.read_bytes()
    rng.write_bytes(data[: len(data) // 2] if damage == "truncated" else random.Random(0).randbytes(len(data)))
    state = torch.get_rng_state()
    with pytest.raises(CorruptCheckpoint, match=rf"{rng} is corrupt \(.*\).*previous complete checkpoint instead, {step_dir(tmp_path, 1)}.*mv .*run.resume=true"):
        read_checkpoint(step_dir(tmp_path, 2))
    assert torch.equal(torch.get_rng_state(), state)
    read_checkpoint(step_dir(tmp_path, 1))
    # The oldest checkpoint has no previous one: another one, or starting over, is the advice.
    (step_dir(tmp_path, 1) / "config.json").write_text('{"run": ', encoding="utf-8")
    with pytest.raises(CorruptCheckpoint, match=rf"config.json is corrupt \(not valid JSON.*other complete checkpoint {step_dir(tmp_path, 2)}"):
        read_checkpoint(step_dir(tmp_path, 1))
    shutil.rmtree(step_dir(tmp_path, 2))
    with pytest.raises(CorruptCheckpoint, match=r"holds no other complete checkpoint: move .* aside .* starts the run over"):
        read_checkpoint(step_dir(tmp_path, 1))


def test_read_checkpoint_can_leave_the_rng_alone(tmp_path):
    torch.manual_seed(3)
    _write(tmp_path, 1)
    expected = torch.rand(3)
    torch.manual_seed(4)
    state = torch.get_rng_state()
    assert read_checkpoint(step_dir(tmp_path, 1), restore_rng=False)[0] == {"step": 1}
    assert torch.equal(torch.get_rng_state(), state)
    read_checkpoint(step_dir(tmp_path, 1))
    assert torch.equal(torch.rand(3), expected)
