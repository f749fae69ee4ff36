"""The shared shape of every subcommand: its own flags, one call, clean errors.

A subcommand is a module with a docstring (its help), `define_flags(fv)` and
`run(flags) -> int`. Each gets its own `absl.flags.FlagValues`, so two
subcommands can both own `--workdir` and library code never sees flags.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import textwrap
from types import ModuleType
from typing import Sequence

from absl import flags

from app import settings
from pipelines.errors import ConfigError, UserError

EXIT_USAGE = 2


def fail(prog: str, message: str) -> int:
    """One line on stderr naming the problem; the caller exits with status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def help_text(prog: str, module: ModuleType, fv: flags.FlagValues) -> str:
    doc = textwrap.dedent(module.__doc__ or "").strip()
    lines = [f"usage: {prog} [--flag=value ...]", "", doc, "", "flags:"]
    for flag in sorted(fv.flags_by_module_dict().get(module.__name__, []), key=lambda f: f.name):
        default = "" if flag.default in (None, "", []) else f" (default: {flag.default_as_str})"
        lines.append(f"  --{flag.name}: {flag.help}{default}")
    return "\n".join(lines)


# What TensorFlow prints on a machine without a GPU, before its logging is set up
# (so TF_CPP_MIN_LOG_LEVEL cannot hide it). Not a problem, so not shown.
_IMPORT_NOISE = re.compile(
    r"absl::InitializeLog|cudart_stub|cuda_platform|cuInit|Could not find cuda drivers"
    r"|cpu_feature_guard|rebuild TensorFlow|oneDNN custom operations|computation placer")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and finds its devices with start-up noise filtered out.

    Anything else TensorFlow writes to stderr meanwhile is still shown.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if not _IMPORT_NOISE.search(line):
                    print(line, file=sys.stderr)


def run_subcommand(prog: str, module: ModuleType, argv: Sequence[str]) -> int:
    """Parses `argv` with the module's flags and runs it.

    Returns:
        The exit status: the module's, or 2 for bad flags or a UserError.
    """
    # Flags come from the library's config dataclasses, whose modules import TensorFlow.
    import_tensorflow_quietly()
    fv = flags.FlagValues()
    module.define_flags(fv)
    own = argv[:argv.index("--")] if "--" in argv else argv
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in own):
        print(help_text(prog, module, fv))
        return 0
    try:
        extra = fv([prog, *argv])[1:]
    except flags.Error as e:
        return fail(prog, f"{e}; see `{prog} --help`")
    takes_arguments = getattr(module, "TAKES_ARGUMENTS", False)
    if extra and not takes_arguments:
        return fail(prog, f"unexpected argument(s) {' '.join(extra)}; flags are written --name=value")
    try:
        return module.run(fv, extra) if takes_arguments else module.run(fv)
    except ConfigError as e:
        return fail(prog, settings.flag_message(fv, e))
    except UserError as e:
        return fail(prog, str(e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the workdir keeps its last complete state", file=sys.stderr)
        return 130
