import json
from pathlib import Path

import pytest

from nemo_guide.cli import apply_threads, main, parse_args
from nemo_guide.config import ConfigError
from nemo_guide.data.errors import DataError
from nemo_guide.errors import RunError

CONF = Path(__file__).resolve().parents[1] / "conf"


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


# -- STYLE point 21: user errors in one line, bugs with their traceback ---------------------------


@pytest.mark.parametrize("error", [ValueError("internal"), KeyError("internal"), TypeError("internal")])
def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch, error):
    import nemo_guide.config

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(nemo_guide.config, "load_config", broken)
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 1\n")
    with pytest.raises(type(error), match="internal"):
        main(["config", str(path)])


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: RunError("cannot start: do this"),
        lambda: DataError("f.jsonl:3: bad; fix it"),
        lambda: ConfigError(["x = 1: bad"], "c.yaml"),
        lambda: FileNotFoundError("dataset file x.jsonl does not exist"),
        lambda: IsADirectoryError("config conf is a directory"),
    ],
)
def test_a_user_error_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys, make_error):
    import nemo_guide.config

    def refuse(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(nemo_guide.config, "load_config", refuse)
    assert main(["config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(make_error()) in err and "Traceback" not in err


def test_a_directory_given_as_config_names_a_yaml_file(capsys):
    assert main(["config", str(CONF)]) == 2
    err = capsys.readouterr().err
    assert f"error: config {CONF} is a directory, not a YAML file; pick one of its YAML files, e.g. {CONF}/" in err


# -- key=value overrides anywhere ------------------------------------------------------------------


def test_overrides_may_follow_flags():
    args = parse_args(["train", "conf/x.yaml", "--no-progress", "run.steps=2", "run.seed=3"])
    assert args.no_progress and args.overrides == ["run.steps=2", "run.seed=3"]
    args = parse_args(["train", "conf/x.yaml", "run.steps=1", "--no-progress", "run.steps=2"])
    assert args.overrides == ["run.steps=1", "run.steps=2"]  # in order: the later one wins
    # after an option taking several values, and next to an option whose value holds '='
    args = parse_args(["eval", "c.yaml", "--k", "1", "4", "checkpoint=runs/x/step_1", "--benchmark", "gsm8k=g.jsonl", "data.eval_limit=4"])
    assert args.k == [1, 4] and args.benchmark == ["gsm8k=g.jsonl"]
    assert args.overrides == ["checkpoint=runs/x/step_1", "data.eval_limit=4"]


def test_overrides_after_a_flag_reach_the_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 1\n")
    assert main(["config", str(path), "run.steps=5", "algorithm.group_size=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run"]["steps"] == 5 and out["algorithm"]["group_size"] == 4


def test_an_unknown_flag_is_reported_with_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["train", "conf/x.yaml", "--no-progress", "--bogus", "run.steps=2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: nemo-guide train" in err and "unrecognized arguments: --bogus" in err


# -- --threads -------------------------------------------------------------------------------------


@pytest.fixture
def keep_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_auto_is_one_on_cpu_and_torchs_default_on_a_gpu(monkeypatch, capsys, keep_threads):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(2)
    assert apply_threads("auto", "cpu") == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert apply_threads("auto", "auto") == 1  # auto without CUDA is CPU
    err = capsys.readouterr().err
    assert err.count("torch threads: 1 (--threads auto: the policy runs on CPU)") == 2
    assert "more help only on an otherwise idle machine" in err
    assert apply_threads(3, "cpu") == 3 and torch.get_num_threads() == 3
    with pytest.raises(RunError, match="no CUDA device is visible"):
        apply_threads("auto", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.set_num_threads(2)
    assert apply_threads("auto", "auto") == 2 and apply_threads("auto", "cuda:0") == 2  # the GPU policy: torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert apply_threads("auto", "cpu") == 2  # an explicit OMP_NUM_THREADS is kept
    assert "(OMP_NUM_THREADS)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "c.yaml"],
        ["eval", "c.yaml"],
        ["warmstart", "--out", "w.safetensors"],
        ["convert", "hf-to-megatron", "in", "out"],
    ],
)
def test_every_torch_command_takes_threads_with_default_auto(argv):
    assert parse_args(argv).threads == "auto"
    assert parse_args([*argv, "--threads", "4"]).threads == 4
    with pytest.raises(SystemExit):
        parse_args([*argv, "--threads", "0"])


def test_eval_logs_the_thread_count_once(tmp_path, monkeypatch, capsys, keep_threads):
    from conftest import SMALL, TINY_CONF

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = ["eval", str(TINY_CONF), *SMALL, "backend.device=cpu", "--limit", "2", "--n", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().err.count("torch threads: 1 (--threads auto: the policy runs on CPU)") == 1


# -- warmstart never overwrites the packaged asset by default ---------------------------------------


def test_warmstart_needs_out_or_overwrite_asset(tmp_path, monkeypatch, capsys, keep_threads):
    import nemo_guide.backends.torch.warmstart as warmstart

    calls = []
    monkeypatch.setattr(warmstart, "build_warmstart", lambda out, **kwargs: calls.append(Path(out)))
    before = warmstart.ASSET.stat().st_mtime_ns
    assert main(["warmstart"]) == 2
    err = capsys.readouterr().err
    assert "warmstart writes to --out FILE.safetensors" in err and "--overwrite-asset" in err
    assert main(["warmstart", "--out", str(tmp_path / "w.safetensors"), "--overwrite-asset"]) == 2
    assert calls == [] and warmstart.ASSET.stat().st_mtime_ns == before
    assert main(["warmstart", "--out", str(tmp_path / "w.safetensors")]) == 0
    assert main(["warmstart", "--overwrite-asset"]) == 0
    assert calls == [tmp_path / "w.safetensors", warmstart.ASSET]


# -- a data file that is not UTF-8: file and line, from every command that reads one ------------------


def _latin1_records(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"id": "1", "problem": "1+1=", "answer": "2", "hint": "add", "solution": "2"}\n'
        b'{"id": "2", "problem": "caf\xe9 2+2=", "answer": "4", "hint": "add", "solution": "4"}\n'
    )
    return path


def test_train_names_file_and_line_of_a_non_utf8_dataset(tmp_path, capsys, keep_threads):
    from conftest import SMALL, TINY_CONF

    data = _latin1_records(tmp_path)
    argv = ["train", str(TINY_CONF), *SMALL, f"data.train={data}", f"run.output_dir={tmp_path / 'runs'}", "run.steps=1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: not valid UTF-8 (byte 0xe9 at byte 28 of the line); save the file as UTF-8" in err
    assert "Traceback" not in err


def test_eval_names_file_and_line_of_a_non_utf8_benchmark(tmp_path, capsys, keep_threads):
    from conftest import TINY_CONF

    data = _latin1_records(tmp_path)
    assert main(["eval", str(TINY_CONF), "--benchmark", f"mine={data}", "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert f"{data}:2: not valid UTF-8 (byte 0xe9" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_data_prepare_drops_a_non_utf8_line_by_file_and_line(tmp_path, capsys):
    data = _latin1_records(tmp_path)
    out = tmp_path / "records.jsonl"
    assert main(["data", "prepare", str(data), str(out), "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == 1 and summary["dropped_by_reason"] == {"not a JSON object": 1}
    assert summary["examples"]["not a JSON object"] == [f"{data}:2"]
    dropped = json.loads((tmp_path / "records.jsonl.dropped.jsonl").read_text())
    assert dropped["where"] == f"{data}:2" and dropped["detail"].startswith("not valid UTF-8 (byte 0xe9")


def test_bad_hint_flags_and_a_damaged_parquet_file_are_one_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "1", "problem": "p", "answer": "1", "solution": "s"}\n')
    assert main(["hints", str(src), str(tmp_path / "out.jsonl"), "--base-url", "localhost:8000", "--model", "m"]) == 2
    assert "base_url = 'localhost:8000': must start with http:// or https://" in capsys.readouterr().err
    bad = tmp_path / "rows.parquet"
    bad.write_bytes(b"not parquet at all")
    assert main(["data", "prepare", str(bad), str(tmp_path / "r.jsonl"), "--workers", "1"]) == 2
    assert f"{bad}: cannot be read as Parquet" in capsys.readouterr().err


def test_convert_of_an_unsupported_model_is_one_line(tmp_path, capsys):
    """A conversion refusal (here: a model family convert/ does not map) is a user error, not a traceback."""
    import json as _json

    from nemo_guide.cli import main as cli_main

    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(_json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    assert cli_main(["convert", "hf-to-megatron", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model_type 'gpt2' is not supported" in err
