"""Checks shared by the model configs."""

from __future__ import annotations

from typing import Iterable


def check_sizes(config, positive: Iterable[str]) -> None:
    """Raises ValueError naming the first size below 1, or a dropout outside [0, 1) (None: the run decides)."""
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be at least 1")
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout={config.dropout} must be in [0, 1)")
