"""Command-line flags made from config dataclasses: a setting is written once.

A library config (`pipelines.training.TrainConfig`, ...) is a frozen dataclass
whose fields carry the type and the default, and whose docstring's
`Attributes:` section carries each field's help. `define(fv, Config)` turns
every field into an absl flag of the same name - DEFINE_enum for a `Literal`
type, DEFINE_list for a tuple (of strings or integers), DEFINE_integer/float/bool/string
otherwise (`X | None` keeps None as the default) - and `build(fv, Config)`
makes the config back from the parsed flags. The pipeline file's schema
(`app/pipeline_file.py`) is made from the same fields, so flags, YAML keys and
dataclasses cannot drift apart (tests/test_settings.py checks).

The flags every command that has them shares, with one meaning: --progress
(`define_progress`, `keras_verbose`) and the strategy/precision fields of
`pipelines.strategy.Devices`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from typing import Any, Iterable, Literal

from absl import flags

from pipelines.errors import ConfigError, UserError

def field_help(cls: type) -> dict[str, str]:
    """Field name -> its help, from the `Attributes:` sections of the class's docstring and its bases'.

    An entry may name several fields (`steps, batch_size: ...`) and run over several indented lines.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__") or ""
        if "Attributes:" not in doc:
            continue
        section = doc.split("Attributes:", 1)[1]
        entries: list[tuple[list[str], list[str]]] = []
        indent = None
        for line in section.splitlines()[1:]:
            if not line.strip():
                if entries:
                    break
                continue
            width = len(line) - len(line.lstrip())
            indent = width if indent is None else indent
            if width < indent:
                break
            match = re.match(r"\s*([\w, ]+):\s*(.*)", line) if width == indent else None
            if match:
                entries.append(([n.strip() for n in match.group(1).split(",")], [match.group(2)]))
            elif entries:
                entries[-1][1].append(line.strip())
        for names, text in entries:
            for name in names:
                docs[name] = " ".join(text)
    return docs


class _IntListParser(flags.ListParser):
    """Comma-separated integers ('1,2,4')."""

    def parse(self, argument):
        values = super().parse(argument)
        try:
            return [int(v) for v in values]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {argument!r}") from None

    def flag_type(self):
        return "comma separated list of integers"


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def choices(cls: type, name: str) -> tuple | None:
    """The allowed values of a `Literal`-typed field, else None."""
    hint, _ = _base_type(typing.get_type_hints(cls)[name])
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_choices(config: Any) -> None:
    """Raises ConfigError for the first `Literal`-typed field whose value is not one of its choices."""
    for f in dataclasses.fields(config):
        allowed = choices(type(config), f.name)
        value = getattr(config, f.name)
        if allowed is not None and value is not None and value not in allowed:
            raise ConfigError(f.name, value, f"expected one of {'|'.join(map(str, allowed))}")


def define(fv: flags.FlagValues, cls: type, *, exclude: Iterable[str] = (), rename: dict[str, str] | None = None,
           defaults: dict[str, Any] | None = None, help: dict[str, str] | None = None,
           module_name: str | None = None) -> None:
    """Defines one flag per field of the dataclass `cls`.

    Args:
        fv: the command's flags.
        cls: the config dataclass.
        exclude: fields the command fills in itself (or takes from elsewhere).
        rename: field -> flag name, where the command's word differs.
        defaults: field -> the command's default, where it differs from the dataclass's.
        help: field -> help text, where the command says more than the docstring.
        module_name: the command module the flags belong to (for its --help); default: the caller's.
    """
    module_name = module_name or sys._getframe(1).f_globals["__name__"]
    docs = field_help(cls)
    hints = typing.get_type_hints(cls)
    rename, defaults, help = rename or {}, defaults or {}, help or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        name = rename.get(f.name, f.name)
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = None
        text = help.get(f.name) or docs.get(f.name)
        if not text:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: document it under Attributes:")
        hint, _ = _base_type(hints[f.name])
        kwargs = dict(flag_values=fv, module_name=module_name)
        allowed = choices(cls, f.name)
        if allowed is not None:
            flags.DEFINE_enum(name, default, [str(a) for a in allowed], text, **kwargs)
        elif hint is bool:
            flags.DEFINE_bool(name, default, text, **kwargs)
        elif hint is int:
            flags.DEFINE_integer(name, default, text, **kwargs)
        elif hint is float:
            flags.DEFINE_float(name, default, text, **kwargs)
        elif hint is str:
            flags.DEFINE_string(name, default, text, **kwargs)
        elif typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is int:
            flags.DEFINE(_IntListParser(), name, list(default) if default is not None else None, text,
                         serializer=flags.CsvListSerializer(","), **kwargs)
        elif typing.get_origin(hint) is tuple:
            flags.DEFINE_list(name, list(default) if default is not None else None, text, **kwargs)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {hint!r}")
        if default is None and f.default is dataclasses.MISSING and f.name not in defaults:
            flags.mark_flag_as_required(name, flag_values=fv)
        # The field a flag sets, where the names differ (prepare's --tokenizer is TokenizerConfig.kind),
        # so a ConfigError names the flag the user typed.
        fv[name].config_field = f.name


def define_overrides(fv: flags.FlagValues, classes: dict[str, type], *, exclude: Iterable[str] = ()) -> list[str]:
    """One flag per field of the model configs, default None (the preset's value), help per family.

    Returns:
        The fields made flags (what `overrides` reads back).
    """
    module_name = sys._getframe(1).f_globals["__name__"]
    helps: dict[str, list[str]] = {}
    owner: dict[str, type] = {}
    for family, cls in classes.items():
        docs = field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            owner.setdefault(f.name, cls)
            helps.setdefault(f.name, []).append(f"{family}: {docs[f.name].rstrip('.')}")
    for name, cls in owner.items():
        text = "override of the preset: " + "; ".join(helps[name])
        define(fv, cls, exclude=[f.name for f in dataclasses.fields(cls) if f.name != name],
               defaults={name: None}, help={name: text}, module_name=module_name)
        fv[name].model_override = True
    return list(owner)


def overrides(fv: flags.FlagValues) -> dict[str, Any]:
    """The model overrides (`define_overrides`) the user set."""
    return {name: fv[name].value for name in fv
            if getattr(fv[name], "model_override", False) and fv[name].value is not None}


def check_mapping(cls: type, mapping: dict[str, Any], *, exclude: Iterable[str] = ()) -> None:
    """Checks a mapping (a pipeline file's section) against the fields of `cls`: names, types and choices.

    Raises:
        ConfigError: a key that is not a field, or a value of the wrong type or not among the choices.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    for key, value in mapping.items():
        if key not in known:
            raise ConfigError(key, value, f"no such setting; the settings are {', '.join(sorted(known))}")
        hint, optional = _base_type(hints[key])
        allowed = choices(cls, key)
        if value is None and optional:
            continue
        if allowed is not None:
            ok = value in allowed
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, item) and not isinstance(v, bool) for v in value)
        else:
            ok = not isinstance(hint, type) or isinstance(value, hint)
        if not ok:
            expected = ("one of " + "|".join(map(str, allowed)) if allowed is not None else
                        f"a list of {_ITEM_NAMES[typing.get_args(hint)[0]]}" if typing.get_origin(hint) is tuple else
                        "a number" if hint is float else f"a value of type {getattr(hint, '__name__', hint)}")
            raise ConfigError(key, value, f"expected {expected}" + (" or null" if optional else ""))


_ITEM_NAMES = {str: "strings", int: "integers"}


def from_mapping(cls: type, mapping: dict[str, Any], **given: Any) -> Any:
    """The config `cls` from a checked mapping plus the fields the caller fills in (`given`)."""
    check_mapping(cls, mapping, exclude=given)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                and f.name not in mapping and f.name not in given:
            raise ConfigError(f.name, "", "is required")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in mapping.items()}, **given)


def values(fv: flags.FlagValues, cls: type, *, exclude: Iterable[str] = (),
           rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The parsed values of the flags `define` made for `cls`, by field name."""
    rename = rename or {}
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        value = fv[rename.get(f.name, f.name)].value
        if value is not None and typing.get_origin(_base_type(hints[f.name])[0]) is tuple:
            value = tuple(value)
        out[f.name] = value
    return out


def build(fv: flags.FlagValues, cls: type, *, exclude: Iterable[str] = (), rename: dict[str, str] | None = None,
          **given: Any) -> Any:
    """The config `cls` from its flags, plus the fields the command fills in (`given`)."""
    return cls(**values(fv, cls, exclude=(*exclude, *given), rename=rename), **given)


def flag_message(fv: flags.FlagValues, error: ConfigError) -> str:
    """A ConfigError in the words of the command line: `--flag=value: message`."""
    name = error.field
    if name not in fv:  # a renamed flag
        name = next((n for n in fv if getattr(fv[n], "config_field", None) == error.field), name)
    return ConfigError(name, error.value, error.message).as_flag()


# --progress: one flag, one meaning, for every command that trains.
PROGRESS = ("bar", "epoch", "none")


def define_progress(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("progress", "bar", list(PROGRESS),
                      "Keras progress output: bar (a bar on a terminal; a line per epoch into a file or pipe), "
                      "epoch, none", flag_values=fv, module_name=sys._getframe(1).f_globals["__name__"])


def keras_verbose(progress: str) -> int:
    """Keras's `verbose` for --progress.

    Keras's bar redraws itself with backspaces on stdout: into a file or pipe that is one line
    growing by ~70 bytes a step, so there the bar becomes a line per epoch.
    """
    return {"bar": 1 if sys.stdout.isatty() else 2, "epoch": 2, "none": 0}[progress]


# --prompt, --max_new_tokens and the sampler: one definition for the commands that generate text
# (`lmstack generate` in this process, `lmstack client` from a server), so both take the same flags
# with the same defaults and meanings.
MAX_NEW_TOKENS = 100
SAMPLER_FLAGS = {"name": "sampler"}  # SamplerConfig.name is --sampler


def define_generation(fv: flags.FlagValues) -> None:
    from models.samplers import SamplerConfig

    module_name = sys._getframe(1).f_globals["__name__"]
    flags.DEFINE_string("prompt", "", "text to continue (empty: start a new document)", flag_values=fv,
                        module_name=module_name)
    flags.DEFINE_integer("max_new_tokens", MAX_NEW_TOKENS, "tokens to generate at most", flag_values=fv,
                         module_name=module_name)
    define(fv, SamplerConfig, rename=SAMPLER_FLAGS, module_name=module_name)


def sampler(fv: flags.FlagValues):
    """The `SamplerConfig` of `define_generation`'s flags; ConfigError for a bad value."""
    from models.samplers import SamplerConfig

    if fv.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", fv.max_new_tokens, "must be at least 1")
    try:
        return build(fv, SamplerConfig, rename=SAMPLER_FLAGS)
    except ValueError as e:  # models/ checks its own configs (it imports nothing of the project)
        raise UserError(f"--{e}") from None
