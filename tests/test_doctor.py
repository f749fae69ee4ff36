"""`lmstack doctor`: says what is wrong with an installation and how to fix it."""

import subprocess
import sys

import pytest

from app import doctor

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


def test_doctor_on_this_installation():
    # A fresh process, as a user runs it: the smoke tests must not see state other tests left behind.
    result = subprocess.run([sys.executable, "-m", "app", "doctor"], capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-2000:]
    assert "TFLite model in ai-edge-litert" in out and "checks passed" in out and "FAIL" not in out
