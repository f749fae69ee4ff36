"""Hugging Face-named checkpoint tensors into a built lmstack model, each used once and checked."""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipelines.errors import UserError


class Copier:
    """Takes tensors by name from a checkpoint and puts them into a model's layers.

    Args:
        model: the built model.
        weights: name -> float32 array.
        what: what the checkpoint should be, for the messages ("GPT-2", ...).
    """

    def __init__(self, model, weights: dict[str, np.ndarray], what: str):
        self.model, self.weights, self.what = model, weights, what
        self.used: set[str] = set()

    def take(self, name: str, part: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
        if name not in self.weights:
            raise UserError(f"the checkpoint has no tensor {name}; is it a whole {self.what} checkpoint?")
        self.used.add(name)
        return part(self.weights[name])

    def put(self, layer_name: str, *values: np.ndarray) -> None:
        layer = self.model.get_layer(layer_name)
        for variable, value in zip(layer.weights, values):
            if tuple(variable.shape) != value.shape:
                raise UserError(f"{layer_name}: the checkpoint's tensor has shape {list(value.shape)}, its "
                                f"config.json says {variable.shape.as_list()}; the files do not belong together")
            variable.assign(value)

    def check_all_used(self, constants: tuple[str, ...] = ()) -> None:
        """Raises UserError naming tensors left over (`constants`: name endings that are buffers, not weights)."""
        extra = sorted(k for k in self.weights if k not in self.used and not k.endswith(constants))
        if extra:
            raise UserError(f"the checkpoint has tensors lmstack's {self.what} has no place for "
                            f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); is it {self.what}?")
