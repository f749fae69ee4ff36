"""The one place lmstack imports Keras from.

Models are tf_keras (Keras 2) models because TF-MOT wraps only those
(tensorflow/model-optimization#1119). Everything else in `models/` writes
`from models.backend import keras`; nothing imports Keras 3 or TensorFlow's keras alias.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow_model_optimization as tfmot
import tf_keras as keras

# Custom layers subclass these so `prune_low_magnitude` can wrap a whole model
# and `cluster_weights` can wrap the layers that hold big weights.
PrunableLayer = tfmot.sparsity.keras.PrunableLayer
ClusterableLayer = tfmot.clustering.keras.ClusterableLayer

__all__ = ["keras", "PrunableLayer", "ClusterableLayer"]
