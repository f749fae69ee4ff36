"""The base of the exported modules: a tf.Module that tf.saved_model.save writes as its signatures,
its variables and its assets, and nothing else.

`tf.saved_model.save` walks the object graph from the module. Left as it is, that walk serializes a
Keras model's every layer with its Keras metadata and traces its call functions, and lists every
tf.function attribute of the module (the graphs' helpers too) and traces each again. None of that
is read: TensorFlow Serving, `lmstack serve` and every lmstack backend call the signatures, which
`save(..., signatures=)` writes on its own. Skipping it halves an export's time.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.trackable.base import SaveType, Trackable  # the hook tf.saved_model.save walks


class _Hidden:
    """Holds an object where tf.Module's attribute tracking does not look (it is not trackable)."""

    def __init__(self, value):
        self.value = value


class ServedModule(tf.Module):
    """A module around a Keras model whose SavedModel holds the model's variables, not the model.

    Args:
        name: the module's name.
        model: the Keras model its signatures call (as `self.model`).
    """

    def __init__(self, name: str, model):
        super().__init__(name=name)
        self._keras = _Hidden(model)
        self.model_variables = list(model.variables)  # what the signatures capture, saved and restored

    @property
    def model(self):
        return self._keras.value

    def _trackable_children(self, save_type=SaveType.CHECKPOINT, **kwargs):
        """For a SavedModel: the tracked attributes only (variables, tokenizer, assets), not the
        tf.functions AutoTrackable would list and trace again (see the module docstring)."""
        if save_type != SaveType.SAVEDMODEL:
            return super()._trackable_children(save_type, **kwargs)
        return Trackable._trackable_children(self, save_type, **kwargs)
