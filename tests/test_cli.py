import subprocess
import sys

import pytest

from tests.helpers import run_cli



def test_help_lists_subcommands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "SUBCOMMAND --help" in out
    for name in ("prepare", "train", "evaluate", "generate", "launch"):
        assert name in out


def test_subcommand_help_explains_its_flags(capsys):
    code, out, _ = run_cli(capsys, "prepare", "--help")
    assert code == 0
    for flag in ("--corpus", "--workdir", "--tokenizer", "--vocab_size", "--val_fraction", "--seed",
                 "--overwrite", "--encoding_errors"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["train-everything"], "unknown subcommand"),
    (["prepare", "--no_such_flag=1", "--corpus=x", "--workdir=y"], "no_such_flag"),
    (["prepare", "--corpus=x"], "workdir"),
    (["prepare", "--corpus=x", "--workdir=y", "--tokenizer=unigram"], "tokenizer"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


@pytest.mark.slow
def test_installed_console_script_and_module_entry_point(tmp_path):
    lmstack = [sys.executable, "-m", "app"]
    out = subprocess.run(lmstack + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "prepare" in out.stdout
    bad = subprocess.run(lmstack + ["prepare", f"--corpus={tmp_path / 'missing.txt'}", f"--workdir={tmp_path / 'r'}"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    missing = tmp_path / "missing.txt"
    assert bad.stderr.strip().splitlines() == [f"lmstack prepare: error: --corpus={missing}: no such file"]
    script = subprocess.run([str(__import__("pathlib").Path(sys.executable).parent / "lmstack"), "prepare", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "--corpus" in script.stdout


@pytest.mark.parametrize("argv, message", [
    (["launch", "--workers=2"], "no command to launch"),
    (["launch", "--workers=0", "--", "train"], "--workers=0"),
])
def test_launch_usage_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
