"""The exceptions that mean "the user gave us something wrong".

Library code raises `UserError` with a message that names the bad value and
says what to do; `app/` prints that message on one line and exits with status
2, without a traceback. Any other exception is a bug and keeps its traceback.

A bad value of one setting (a field of a config dataclass) is a `ConfigError`:
it names the field, so each front end says it in its own words - the command
line as `--steps=0: must be at least 1`, the pipeline file as
`train.steps: must be at least 1 (got 0)`, Python as `steps=0: ...`.
"""

from __future__ import annotations

from typing import Any, Iterable


class UserError(Exception):
    """Bad input from the user: a missing file, a bad flag value, a bad workdir."""


class ConfigError(UserError):
    """A setting's value is wrong.

    Args:
        field: the config field (the flag and the pipeline key have the same name).
        value: the value given.
        message: what is wrong and what to do, without the field's name.
    """

    def __init__(self, field: str, value: Any, message: str):
        self.field, self.value, self.message = field, value, message
        super().__init__(f"{field}={_show(value)}: {message}")

    def as_flag(self) -> str:
        return f"--{self.field}={_show(self.value)}: {self.message}"

    def as_key(self, section: str) -> str:
        got = "" if self.value in (None, "") else f" (got {_show(self.value)})"
        return f"{section}.{self.field}: {self.message}{got}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(field, value, f"expected one of {'|'.join(map(str, choices))}")


def check_at_least(config: Any, minimum: float, *fields: str) -> None:
    """Each field (None: unset, skipped) must be at least `minimum`."""
    for field in fields:
        value = getattr(config, field)
        if value is not None and value < minimum:
            raise ConfigError(field, value, "must not be negative" if minimum == 0 else f"must be at least {minimum}")
