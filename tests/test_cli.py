"""The command line as a user calls it (in-process: the same main() the console script runs)."""
import json

from sparserm.cli import main


def test_data_check_on_shipped_hh(shared_data, tmp_path, capsys):
    assert main(["data", "check", str(shared_data / "hh_rlhf_harmless.jsonl.gz"), "--output-dir", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_pairs"] + summary["n_rejected"] == 1505
    assert summary["reasons"]["prefix_mismatch"] == 3
    rejects = [json.loads(line) for line in open(summary["rejects_path"])]
    assert len(rejects) == summary["n_rejected"]


def test_data_check_counts_bad_rows_and_fails_only_on_unreadable_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n'
                    b'{"prompt": "p", "chosen": 3, "rejected": "b"}\n{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n')
    assert main(["data", "check", str(bad), "--output-dir", str(tmp_path / "o")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_pairs"], summary["n_rejected"]) == (1, 3)
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in json.loads(capsys.readouterr().out)["error"]


def test_config_errors_exit_2_naming_the_key(capsys):
    assert main(["features", "reward.nope=1"]) == 2
    assert "reward.nope" in capsys.readouterr().err
    # a missing config file whose folder has "=" in its name is a missing file, not an override "runs/lr"
    assert main(["features", "runs/lr=1e-3/cfg.yaml"]) == 2
    assert "config file runs/lr=1e-3/cfg.yaml does not exist" in capsys.readouterr().err


def test_overrides_go_before_or_after_the_options_as_the_readme_and_gpu_check_write_them(capsys):
    import pytest

    from sparserm.cli import parse_args

    args = parse_args(["align", "c.yaml", "align.rounds=1", "--output-dir", "out", "align.filters=[rm]", "x.y=2"])
    assert args.config == "c.yaml" and args.output_dir == "out"
    assert args.overrides == ["align.rounds=1", "align.filters=[rm]", "x.y=2"]  # in the order typed
    serve = parse_args(["serve", "rm", "RM", "--host", "0.0.0.0", "serve.num_gpus=0.5"])
    assert serve.rm_dir == "RM" and serve.host == "0.0.0.0" and serve.overrides == ["serve.num_gpus=0.5"]
    assert parse_args(["steer", "build", "c.yaml", "--output-dir", "o", "steer.alpha=2"]).overrides == ["steer.alpha=2"]
    # anything else left over is still an error, naming it
    with pytest.raises(SystemExit):
        parse_args(["align", "c.yaml", "--output-dir", "out", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["data", "check", "f.jsonl", "a=1"])  # a command without overrides takes none
    assert "unrecognized arguments: a=1" in capsys.readouterr().err
