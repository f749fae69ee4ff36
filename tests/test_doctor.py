"""`lmstack doctor`: says what is wrong with an installation and how to fix it."""

import os
import subprocess
import sys

import pytest

from app import doctor
from tests.helpers import run_cli

GOOD = {"tensorflow": "2.21.0", "tf-keras": "2.21.0", "tensorflow-text": "2.21.1", "tensorflow-serving-api": "2.21.0",
        "tensorflow-model-optimization": "0.8.1", "keras-nlp": "0.32.0", "ai-edge-litert": "2.3.0",
        "grpcio": "1.70.0", "grpcio-health-checking": "1.70.0", "waitress": "3.0.2", "absl-py": "1.4.0"}


def test_a_consistent_install_passes_every_version_check():
    assert {c.status for c in doctor.version_checks(GOOD.get)} == {"OK"}


def test_a_mismatched_minor_version_fails_and_says_how_to_fix():
    checks = doctor.version_checks({**GOOD, "tensorflow-text": "2.20.0"}.get)
    (bad,) = [c for c in checks if c.status == "FAIL"]
    assert "tensorflow-text" in bad.fix and "2.21" in bad.fix and "pip install" in bad.fix


def test_missing_packages_fail():
    checks = doctor.version_checks({k: v for k, v in GOOD.items() if k != "ai-edge-litert"}.get)
    assert [c.name for c in checks if c.status == "FAIL"] == ["ai-edge-litert (the TFLite runtime)"]
    assert doctor.version_checks(lambda p: None)[0].status == "FAIL"


@pytest.mark.parametrize("value, status", [("1", "OK"), ("0", "FAIL"), (None, "FAIL")])
def test_the_keras_setting(value, status):
    env = {} if value is None else {"TF_USE_LEGACY_KERAS": value}
    assert doctor.keras_check(env).status == status


LOCK = """\
numpy==2.4.6 \\
    --hash=sha256:00
    # via lmstack (setup.cfg)
Tomli==2.0.1 ; python_version < "3.0" \\
    --hash=sha256:11
typing_extensions==4.16.0 \\
    --hash=sha256:22
"""


def test_the_lock_is_read_for_this_python():
    assert doctor.read_lock(LOCK) == {"numpy": "2.4.6", "typing-extensions": "4.16.0"}


def test_drift_names_each_package_and_the_command_that_fixes_it(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(LOCK)
    check = doctor.lock_check(lock, {"numpy": "2.4.5", "typing-extensions": "4.16.0", "six": "1.17.0"})
    assert check.status == "WARN" and "1 of 2 differ" in check.found and "numpy 2.4.5 (lock: 2.4.6)" in check.found
    assert check.fix == f"python -m pip install -c {lock} numpy==2.4.6"
    # What the lock holds but nobody installed (an extra not taken) is not drift; what it does not hold is not either.
    assert doctor.lock_check(lock, {"numpy": "2.4.6", "six": "1.0"}).status == "OK"


def test_without_a_lock_doctor_says_which_flag_gives_one(tmp_path, capsys):
    check = doctor.lock_check(tmp_path / "lock.txt", {})
    assert check.status == "WARN" and "--lock=" in check.fix
    code, _, err = run_cli(capsys, "doctor", f"--lock={tmp_path / 'nothing.txt'}")
    assert code == 2 and "--lock=" in err and "no such file" in err and err.count("\n") == 1, err


def test_doctor_on_this_installation():
    # A fresh process, as a user runs it: the smoke tests must not see state other tests left behind.
    result = subprocess.run([sys.executable, "-m", "app", "doctor"], capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-2000:]
    assert "TFLite model in ai-edge-litert" in out and "checks passed" in out and "FAIL" not in out
    if not os.environ.get("LMSTACK_UNLOCKED"):  # make test-latest's venv holds the newest versions on purpose
        assert "OK    packages at the locked versions" in out, out  # make venv installed the lock, nothing else
