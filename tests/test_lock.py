"""requirements/: the one set of packages CI tests is the set `make venv` installs and users are told to take.

`make lock` writes the locks from setup.cfg's ranges; these tests fail when the two stop agreeing
(a range changed or a dependency added without re-locking) or when the GPU set moves a shared pin.
"""

import configparser

from packaging.requirements import Requirement

from app import doctor
from tests.helpers import ROOT

LOCK, GPU = ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "gpu.txt"


def _requirements(*sections: str) -> list[Requirement]:
    """setup.cfg's requirements: install_requires and the named extras."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    text = cfg["options"]["install_requires"] + "".join(cfg["options.extras_require"][s] for s in sections)
    return [Requirement(line) for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_lock_holds_every_requirement_at_a_version_its_range_takes():
    pins = doctor.read_lock(LOCK.read_text())
    for req in _requirements("test", "beam", "dev"):
        name = doctor.normalize(req.name)
        assert name in pins, f"{req} is not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{LOCK.name} has {name}=={pins[name]}, " \
            f"outside setup.cfg's {req}: run `make lock ARGS='--upgrade-package {name}'`"


def test_the_lock_holds_what_the_makefile_installs_with():
    # make venv: pip and setuptools from the lock (the build runs without isolation), pip-sync from pip-tools.
    pins = doctor.read_lock(LOCK.read_text())
    assert {"pip", "setuptools", "wheel", "pip-tools"} <= pins.keys()
    assert "protobuf" in pins and pins["protobuf"].split(".")[0] == "6"  # one protobuf for the base and Beam


def test_the_gpu_lock_adds_cuda_and_moves_no_shared_pin():
    cpu, gpu = doctor.read_lock(LOCK.read_text()), doctor.read_lock(GPU.read_text())
    moved = {name: (version, gpu.get(name)) for name, version in cpu.items() if gpu.get(name) != version}
    assert not moved, f"gpu.txt differs from lock.txt on {moved}: run `make lock`"
    assert any(name.startswith("nvidia-") for name in gpu.keys() - cpu.keys())
