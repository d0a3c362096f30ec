import json

from nemo_guide.cli import main


def test_config_command_prints_resolved_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  group_size: 4\n")
    assert main(["config", str(path), "run.steps=3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["algorithm"]["group_size"] == 4 and out["run"]["steps"] == 3


def test_config_command_reports_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  group_size: 0\n")
    assert main(["config", str(path)]) == 2
    assert f"{path}:2: algorithm.group_size = 0" in capsys.readouterr().err
