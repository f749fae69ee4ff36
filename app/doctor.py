"""Check the installation: versions that must match, the Keras setting, GPUs, the runtimes lmstack uses.

Each check prints OK, WARN or FAIL with what was found and, when something is
wrong, how to fix it. Exit status 0 when nothing FAILs, 1 otherwise.

  tensorflow, tf-keras, tensorflow-text   one minor version (their ops and ABI are built together)
  tensorflow-serving-api                  the same minor (its protos match TensorFlow's)
  tensorflow-model-optimization 0.8       wraps tf_keras (Keras 2) models only
  keras-nlp, ai-edge-litert, grpcio       tokenizers, the TFLite runtime, gRPC
  TF_USE_LEGACY_KERAS                     must be 1: tf.keras is then Keras 2, what TF-MOT needs
  GPUs                                    what tf.distribute will use; a CUDA build of TensorFlow
  smoke tests                             a keras-nlp tokenizer in a tf.function; a TFLite model in ai-edge-litert
  the lock                                every installed package at the version requirements/lock.txt
                                          holds (the set CI tested), or which differ and the command to fix it

example:
  lmstack doctor
  lmstack doctor --lock=path/to/lmstack/requirements/lock.txt   (lmstack installed from a wheel)
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pathlib
import re
import sys
from typing import Callable, Mapping

from absl import flags

from pipelines.errors import ConfigError

# The lock next to the source, where an editable install (`make venv`) finds it.
CHECKOUT_LOCK = pathlib.Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
FIX_PIN = ("install the locked set: `make venv` in the lmstack checkout, or "
           "`pip install . -c requirements/lock.txt` in your environment")


@dataclasses.dataclass
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    found: str
    fix: str = ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _minor(version: str | None) -> str | None:
    return ".".join(version.split(".")[:2]) if version else None


def version_checks(version: Callable[[str], str | None] = _version) -> list[Check]:
    """The installed packages against lmstack's pins (docs/design.md, "Stack decisions")."""
    checks = []
    tf_version = version("tensorflow")
    if tf_version is None:
        return [Check("tensorflow", "FAIL", "not installed", FIX_PIN)]
    family = {p: version(p) for p in ("tensorflow", "tf-keras", "tensorflow-text", "tensorflow-serving-api")}
    off = {p: v for p, v in family.items() if _minor(v) != _minor(tf_version)}
    found = ", ".join(f"{p} {v or 'missing'}" for p, v in family.items())
    checks.append(Check("TensorFlow family on one minor version", "FAIL" if off else "OK", found,
                        f"{', '.join(off)} not on {_minor(tf_version)}: {FIX_PIN}" if off else ""))
    mot = version("tensorflow-model-optimization")
    checks.append(Check("tensorflow-model-optimization 0.8", "OK" if _minor(mot) == "0.8" else "FAIL",
                        mot or "missing", "" if _minor(mot) == "0.8" else FIX_PIN))
    for package, why in (("keras-nlp", "tokenizers"), ("ai-edge-litert", "the TFLite runtime"),
                         ("grpcio", "gRPC serving and clients"), ("grpcio-health-checking", "the gRPC health service"),
                         ("waitress", "the REST server"), ("absl-py", "the command line")):
        v = version(package)
        checks.append(Check(f"{package} ({why})", "OK" if v else "FAIL", v or "missing", "" if v else FIX_PIN))
    return checks


def normalize(name: str) -> str:
    """A distribution's name as the index compares it (PEP 503): `Typing_Extensions` -> `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


# `name==version` opening a pip-compile requirement, with the environment marker that may follow it.
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;([^\\]*))?")


def read_lock(text: str) -> dict[str, str]:
    """The pins of a pip-compile lock that apply to this Python and platform: normalized name -> version."""
    from packaging.markers import Marker

    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line)
        if m and (not m.group(3) or Marker(m.group(3).strip()).evaluate()):
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    """Every distribution this Python sees: normalized name -> version."""
    return {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def lock_check(lock: pathlib.Path, packages: Mapping[str, str]) -> Check:
    """Installed packages against the lock: which differ (drift), and the command that puts them back.

    Packages the lock holds but that are not installed (an extra not taken) are not drift.
    """
    name = "packages at the locked versions"
    if not lock.is_file():
        return Check(name, "WARN", "no requirements/lock.txt next to this installation (installed from a wheel?)",
                     "pass the lock of the lmstack source you installed: "
                     "`lmstack doctor --lock=.../requirements/lock.txt`")
    pins = read_lock(lock.read_text(encoding="utf-8"))
    drift = {p: (packages[p], v) for p, v in sorted(pins.items()) if p in packages and packages[p] != v}
    present = sum(p in packages for p in pins)
    if not drift:
        return Check(name, "OK", f"{present} of the lock's {len(pins)} installed, each as locked ({lock})")
    found = ", ".join(f"{p} {have} (lock: {want})" for p, (have, want) in drift.items())
    return Check(name, "WARN", f"{len(drift)} of {present} differ from {lock}: {found}",
                 f"python -m pip install -c {lock} " + " ".join(f"{p}=={want}" for p, (_, want) in drift.items()))


def keras_check(environ=os.environ) -> Check:
    """TF_USE_LEGACY_KERAS=1, so tf.keras is Keras 2 (tf_keras), as TF-MOT requires."""
    value = environ.get("TF_USE_LEGACY_KERAS")
    if value in ("1", "true", "True"):
        return Check("TF_USE_LEGACY_KERAS", "OK", f"{value} (tf.keras is tf_keras, Keras 2)")
    return Check("TF_USE_LEGACY_KERAS", "FAIL", repr(value),
                 "unset it or set TF_USE_LEGACY_KERAS=1: lmstack's models and TF-MOT need Keras 2 (tf_keras)")


def runtime_checks() -> list[Check]:
    """What TensorFlow sees, and two smoke tests of the runtimes lmstack uses."""
    import tensorflow as tf

    checks = []
    gpus = tf.config.list_physical_devices("GPU")
    cuda = tf.sysconfig.get_build_info().get("is_cuda_build", False)
    if gpus:
        checks.append(Check("GPUs", "OK", f"{len(gpus)}: {', '.join(g.name for g in gpus)} "
                            f"(--strategy=auto uses MirroredStrategy over them)"))
    else:
        checks.append(Check("GPUs", "WARN", f"none visible (TensorFlow {'with' if cuda else 'without'} CUDA); "
                            f"training runs on {os.cpu_count()} CPU cores",
                            "if this machine has GPUs: `pip install -e .[gpu]` (tensorflow[and-cuda])" if not cuda
                            else "if this machine has GPUs: check the NVIDIA driver (`nvidia-smi`) and "
                            "CUDA_VISIBLE_DEVICES"))
    checks.append(_smoke("keras-nlp tokenizer in a tf.function", _tokenizer_smoke))
    checks.append(_smoke("TFLite model in ai-edge-litert", _tflite_smoke))
    return checks


def _smoke(name: str, test: Callable[[], str]) -> Check:
    try:
        return Check(name, "OK", test())
    except Exception as e:  # any failure is the finding
        return Check(name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", FIX_PIN)


def _tokenizer_smoke() -> str:
    import keras_nlp
    import tensorflow as tf

    tokenizer = keras_nlp.tokenizers.UnicodeCodepointTokenizer()
    ids = tf.function(lambda t: tokenizer.tokenize(t))(tf.constant(["lmstack"]))
    if ids.to_list() != [[ord(c) for c in "lmstack"]]:
        raise RuntimeError(f"unexpected ids {ids.to_list()}")
    return "UnicodeCodepointTokenizer round trip"


def _tflite_smoke() -> str:
    import numpy as np
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def double(x):
        return {"y": 2.0 * x}

    flat = tf.lite.TFLiteConverter.from_concrete_functions([double.get_concrete_function()], double).convert()
    interpreter = Interpreter(model_content=flat)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.arange(4, dtype=np.float32)[None])
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
    if not np.allclose(out, [0, 2, 4, 6]):
        raise RuntimeError(f"wrong result {out}")
    return f"converted and ran a {len(flat)}-byte model"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("lock", None, "the lock to compare installed packages with (default: requirements/lock.txt "
                        "of the checkout lmstack runs from)", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    if fv.lock is not None and not pathlib.Path(fv.lock).is_file():
        raise ConfigError("lock", fv.lock, "no such file; give lmstack's requirements/lock.txt")
    lock = pathlib.Path(fv.lock) if fv.lock is not None else CHECKOUT_LOCK
    checks = [Check("Python >= 3.11", "OK" if sys.version_info >= (3, 11) else "FAIL", sys.version.split()[0],
                    "" if sys.version_info >= (3, 11) else "use Python 3.11 (the lock's) or newer")]
    checks += version_checks() + [lock_check(lock, installed()), keras_check()] + runtime_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status:4}  {c.name.ljust(width)}  {c.found}")
        if c.fix:
            print(f"{'':4}  {'':{width}}  fix: {c.fix}")
    failed = [c for c in checks if c.status == "FAIL"]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed" +
          (f"; {len(failed)} failed" if failed else "") +
          (f"; {sum(c.status == 'WARN' for c in checks)} warning(s)" if any(c.status == "WARN" for c in checks)
           else ""))
    return 1 if failed else 0
