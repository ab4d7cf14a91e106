"""The ``mec`` command: flags and config files become settings; stages run; errors name files."""
import io
import json
import logging
import os
import sys

import pytest

from tests.pipeline_testing import tiny_flags
from torchrec_mec.artifacts import load_artifact
from torchrec_mec.cli import build_parser, main, settings_from_args


def _settings(*argv):
    return settings_from_args(build_parser().parse_args(list(argv)))


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "prepare", "pretrain", "compress", "finetune", "evaluate", "report"):
        assert command in out


def test_flags_config_file_and_set_in_order_of_precedence(tmp_path):
    config = tmp_path / "mec.yaml"
    config.write_text("model: {name: dlrm_dcn, embedding_dim: 24}\n"
                      "compress: {min_rows: 5000, quantizer: {codebook_size: 64}}\n")
    s = _settings("run", "--out", "d", "--format", "synthetic", "--config", str(config),
                  "--codebook-size", "128", "--seed", "7", "--set", "model.embedding_dim=32",
                  "pretrain.dense_lr=2e-3")
    assert s.model.name == "dlrm_dcn"  # from the file
    assert s.model.embedding_dim == 32  # --set beats the file
    assert s.compress.min_rows == 5000 and s.compress.quantizer.codebook_size == 128
    assert (s.pretrain.seed, s.finetune.seed, s.compress.quantizer.seed) == (7, 7, 7)
    assert s.pretrain.dense_lr == 2e-3
    published = _settings("compress", "--out", "d")
    assert (published.model.embedding_dim, published.compress.min_rows,
            published.compress.quantizer.num_subspaces,
            published.compress.quantizer.codebook_size) == (40, 100_000, 4, 256)
    as_json = tmp_path / "mec.json"
    as_json.write_text(json.dumps({"finetune": {"epochs": 3}}))
    assert _settings("finetune", "--out", "d", "--config", str(as_json)).finetune.epochs == 3


def test_bad_settings_exit_2_naming_the_key(tmp_path, capsys):
    assert main(["compress", "--out", str(tmp_path), "--set", "compress.min_row=5"]) == 2
    assert "compress.min_row" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("pretrain: {epochs: many}\n")
    assert main(["pretrain", "--out", str(tmp_path), "--config", str(config)]) == 2
    assert "pretrain.epochs" in capsys.readouterr().err


def test_missing_inputs_exit_1_naming_the_stage_and_the_way_out(tmp_path, capsys):
    assert main(["compress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "compress needs prepare, which has not finished" in err
    assert f"`mec prepare --out {tmp_path} --data FILE --format FORMAT`, then `mec pretrain" in err
    assert main(["run", "--format", "criteo", "--out", str(tmp_path)]) == 1
    assert "--data" in capsys.readouterr().err
    assert main(["run", "--format", "synthetic", "--data", "x.tsv", "--out", str(tmp_path)]) == 1
    assert "give no --data" in capsys.readouterr().err


def test_malformed_input_named_by_line(tmp_path, capsys):
    good = "\t".join(["1"] + ["3"] * 13 + ["a1b2c3d4"] * 26)
    bad = "\t".join(["0"] + ["x"] + ["3"] * 12 + ["a1b2c3d4"] * 26)
    path = tmp_path / "day.tsv"
    path.write_text("\n".join([good] * 20 + [bad] + [good] * 5) + "\n")
    argv = ["prepare", "--data", str(path), "--format", "criteo", "--out", str(tmp_path / "r"),
            "--no-progress"]
    assert main(argv + ["--set", "data.bad_rows=fail"]) == 1
    assert f"{path}, line 21, column I1" in capsys.readouterr().err
    assert main(argv) == 0  # the default skips and counts it
    manifest = json.loads((tmp_path / "r" / "data" / "manifest.json").read_text())
    assert manifest["bad_rows"]["count"] == 1


def test_run_then_report_on_generated_data(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["run", "--format", "synthetic", "--out", out, "--preset", "sample", "--no-progress",
            *tiny_flags()]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 of 4 tables compressed" in printed and "test AUC" in printed
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["memory"]["ratio"] > 1
    assert main(["report", "--out", out]) == 0
    assert "embedding memory" in capsys.readouterr().out


def test_settings_are_checked_before_any_stage_runs(tmp_path, capsys):
    """M not dividing D stops `mec run` before it writes anything; K and min_rows against the
    table sizes stop it once the data is prepared, before pre-training."""
    out = tmp_path / "run"
    argv = ["run", "--format", "synthetic", "--out", str(out), "--preset", "sample",
            "--no-progress", *tiny_flags()]
    assert main(argv + ["compress.quantizer.num_subspaces=3"]) == 2
    assert "must divide model.embedding_dim (D = 8)" in capsys.readouterr().err
    assert not out.exists()
    assert main(argv + ["compress.min_rows=5000"]) == 2
    assert ("compress.min_rows is 5000 but the largest table (C1) has 801 rows: no table would "
            "be compressed") in capsys.readouterr().err
    assert (out / "data" / "manifest.json").exists() and not (out / "pretrain").exists()


def test_out_naming_a_file_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["report", "--out", str(path)])
    assert e.value.code == 2
    assert f"--out {path} is a file" in capsys.readouterr().err


def test_target_ratio_flag_runs_and_reports_the_choice_per_table(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["run", "--format", "synthetic", "--out", out, "--preset", "sample", "--no-progress",
            *tiny_flags(), "--target-ratio", "6"]
    assert main(argv) == 0
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["memory"]["target_ratio"] == 6 and report["memory"]["ratio"] >= 6
    _, counts_meta = load_artifact(os.path.join(out, "pretrain", "counts.mec"))
    for name, t in report["tables"].items():
        assert t["table_weight"] == counts_meta["sensitivity"][name] > 0  # the default weights
        assert t["plan"]["bytes"] == t["bytes_after"]
        assert (t["num_subspaces"], t["codebook_size"]) == (
            t["plan"]["num_subspaces"], t["plan"]["codebook_size"])
    # Tiny tables: 1 byte a row plus 16 codewords at the least, 13.4x at most (by hand:
    # 801 + 512, 401 + 512, 31 + 512 and the 6-row table full (192 B), of 39,648 B).
    assert main(["compress", "--out", out, "--preset", "sample", *tiny_flags(),
                 "--target-ratio", "20"]) == 2
    assert "smallest embedding memory reachable is 2961 B, 13.4x" in capsys.readouterr().err
    # `mec run` finds out once the data is prepared, before pre-training.
    fresh = tmp_path / "fresh"
    assert main([*argv[:4], str(fresh), *argv[5:-1], "20"]) == 2
    assert "13.4x" in capsys.readouterr().err
    assert (fresh / "data" / "manifest.json").exists() and not (fresh / "pretrain").exists()


def test_log_records_after_main_go_to_the_stderr_of_the_moment(tmp_path, monkeypatch):
    """``main`` configures logging; a handler that kept the stderr of that moment wrote every
    later record to it after pytest's capture had closed it ("Logging error ... I/O operation on
    closed file" in the test logs). Records must go to whatever ``sys.stderr`` is then."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("torchrec_mec").level
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    try:
        assert main(["compress", "--out", str(tmp_path)]) == 1
        first.close()  # as pytest closes a finished test's capture
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("torchrec_mec.test").warning("a record after main")
        assert "[rank 0] a record after main" in second.getvalue()
        assert "Logging error" not in second.getvalue()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("torchrec_mec").setLevel(saved[2])
