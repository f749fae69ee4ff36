"""TF-MOT on lmstack's models: what each method wraps, how to strip it, what it achieved.

- `prune`: `prune_low_magnitude` on the whole model. It wraps every layer;
  the weights it prunes are the Dense kernels (attention q/k/v/output, MLP,
  LSTM projection), the token embedding (`TokenEmbedding` is a
  `PrunableLayer`) and the LSTM's kernel and recurrent kernel. Biases, norms
  and the position table stay dense.
- `quantize`: TF-MOT's default 8-bit scheme on the layers it supports here,
  the Dense layers (annotated one by one: `quantize_model` would refuse the
  int32 input and the custom layers). `CausalAttention` is annotated with a
  no-op config so that its Dense consumer does not ask TF-MOT to quantize
  the output of a layer it has no config for; the activation layers (GPT-2's
  tanh GELU, a gated MLP's) get their outputs quantized. Embedding, LSTM,
  LayerNorm/RMSNorm, rotary positions and the attention softmax stay float. With `preserve_sparsity` the
  pruning-preserving scheme (`tfmot.experimental.combine`) keeps the zeros of
  a pruned model through fine-tuning.
- `cluster`: `cluster_weights` on the Dense layers, the LSTM and the token
  embedding (k-means++ initialized centroids).

Quantized models keep their wrappers (the learned ranges are what a TFLite
int8 conversion needs), so a QAT variant is rebuilt with `quantize` before its
checkpoint is restored. Pruned and clustered models are stripped back to the
plain model, whose checkpoints load into `models.build`.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import numpy as np
import tensorflow_model_optimization as tfmot
# The wrapper classes are not in TF-MOT's public API; we only test for them.
from tensorflow_model_optimization.python.core.clustering.keras.cluster_wrapper import ClusterWeights
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

from models.backend import keras
from models.layers import GELU, QUANTIZED_PREFIX, CausalAttention, GatedActivation, custom_objects

sparsity = tfmot.sparsity.keras
quantization = tfmot.quantization.keras
clustering = tfmot.clustering.keras

Schedule = Literal["polynomial", "constant"]
SCHEDULES = typing.get_args(Schedule)


class NoOpQuantizeConfig(quantization.QuantizeConfig):
    """Quantizes nothing: marks a weightless custom layer as part of the quantized graph."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


class OutputQuantizeConfig(NoOpQuantizeConfig):
    """Quantizes only the output (8-bit, asymmetric, moving-average range): for a weightless
    activation layer, as TF-MOT's default scheme treats the activations it knows."""

    def get_output_quantizers(self, layer):
        return [quantization.quantizers.MovingAverageQuantizer(
            num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]


def _scope():
    return quantization.quantize_scope({**custom_objects(), "NoOpQuantizeConfig": NoOpQuantizeConfig,
                                        "OutputQuantizeConfig": OutputQuantizeConfig})


def pruning_schedule(kind: str, target: float, begin_step: int, end_step: int, frequency: int):
    """TF-MOT's schedule: `polynomial` ramps sparsity from 0 to `target` over [begin, end]."""
    if kind == "constant":
        return sparsity.ConstantSparsity(target, begin_step=begin_step, frequency=frequency)
    return sparsity.PolynomialDecay(initial_sparsity=0.0, final_sparsity=target, begin_step=begin_step,
                                    end_step=end_step, frequency=frequency)


def prune(model: keras.Model, schedule, m_by_n: tuple[int, int] | None = None) -> keras.Model:
    """The whole model wrapped for magnitude pruning (train with `sparsity.UpdatePruningStep`)."""
    kwargs = {"sparsity_m_by_n": m_by_n} if m_by_n else {"pruning_schedule": schedule}
    return sparsity.prune_low_magnitude(model, **kwargs)


def pruned_weight_names(wrapped: keras.Model) -> list[str]:
    """Names (as in the stripped model) of the weights a pruning-wrapped model prunes."""
    names = []
    for layer in wrapped.layers:
        if isinstance(layer, PruneLowMagnitude):
            names += [weight_name(layer.layer, weight) for weight, _, _ in layer.pruning_vars]
    return names


def quantize(model: keras.Model, preserve_sparsity: bool = False) -> keras.Model:
    """Quantization-aware model: fake-quantized Dense weights and outputs (8-bit)."""
    def annotate(layer):
        if isinstance(layer, keras.layers.Dense):
            return quantization.quantize_annotate_layer(layer)
        if isinstance(layer, CausalAttention):
            return quantization.quantize_annotate_layer(layer, NoOpQuantizeConfig())
        if isinstance(layer, (GELU, GatedActivation)):
            return quantization.quantize_annotate_layer(layer, OutputQuantizeConfig())
        return layer

    with _scope():
        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme() if preserve_sparsity else None
        return quantization.quantize_apply(annotated, scheme) if scheme else quantization.quantize_apply(annotated)


def float_layers(quantized: keras.Model) -> list[str]:
    """Layers with weights that QAT left in float."""
    return [layer.name for layer in quantized.layers
            if layer.weights and not isinstance(layer, quantization.QuantizeWrapperV2)]


def cluster(model: keras.Model, clusters: int) -> keras.Model:
    """Dense kernels, LSTM weights and the token embedding share `clusters` values each."""
    init = clustering.CentroidInitialization.KMEANS_PLUS_PLUS

    def wrap(layer):
        if isinstance(layer, (keras.layers.Dense, keras.layers.LSTM, keras.layers.GRU, clustering.ClusterableLayer)):
            return clustering.cluster_weights(layer, number_of_clusters=clusters, cluster_centroids_init=init)
        return layer

    with _scope():
        # cluster_weights rewires the layer it wraps: wrap the layers of a copy, not of `model`.
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        return keras.models.clone_model(copy, clone_function=wrap)


def strip(model: keras.Model) -> keras.Model:
    """The plain model under a pruning or clustering wrapper (QAT wrappers stay)."""
    return clustering.strip_clustering(sparsity.strip_pruning(model))


def wrappers(model: keras.Model) -> list[str]:
    """Names of TF-MOT wrapper layers still in a model."""
    kinds = (PruneLowMagnitude, quantization.QuantizeWrapperV2, ClusterWeights)
    return [layer.name for layer in model.layers if isinstance(layer, kinds)]


def weight_name(layer: keras.layers.Layer, weight) -> str:
    """`LAYER/WEIGHT`, the same with or without TF-MOT's wrappers (`block0_query/kernel`, `rnn0/kernel`).

    Variable names alone are not stable: `strip_clustering` recreates them without the layer's scope.
    """
    return f"{layer.name.removeprefix(QUANTIZED_PREFIX)}/{weight.name.split(':')[0].split('/')[-1]}"


def weight_report(model: keras.Model) -> list[dict[str, Any]]:
    """Per weight matrix (ndim >= 2): size, non-zeros, sparsity and distinct values."""
    rows = []
    for layer in model.layers:
        for weight in layer.weights:
            if len(weight.shape) < 2 or "kernel" not in weight.name and "embedding" not in weight.name \
                    and "positions" not in weight.name:
                continue
            value = weight.numpy()
            nonzero = int(np.count_nonzero(value))
            rows.append({"weight": weight_name(layer, weight), "shape": list(value.shape), "size": int(value.size),
                         "nonzero": nonzero, "sparsity": 1.0 - nonzero / value.size,
                         "distinct": int(np.unique(value).size)})
    return rows


def freeze_uncovered(quantized: keras.Model, pruned: list[str]) -> list[str]:
    """Freezes the float layers holding pruned weights; returns their names.

    The pruning-preserving QAT scheme keeps the zeros of the Dense kernels it
    wraps; the token embedding and LSTM kernels it leaves in float would grow
    theirs back in training, so they stay as the pruned model had them.
    """
    frozen = []
    for layer in quantized.layers:
        if isinstance(layer, quantization.QuantizeWrapperV2):
            continue
        if any(weight_name(layer, w) in pruned for w in layer.weights):
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def parameters(model: keras.Model) -> list:
    """The model's own weights: without the ranges and step counters TF-MOT's QAT wrappers add."""
    params = []
    for layer in model.layers:
        own = [w for w in layer.weights if not w.name.startswith(layer.name + "/")] \
            if isinstance(layer, quantization.QuantizeWrapperV2) else layer.weights
        params += own
    return params


def count_nonzero(model: keras.Model) -> tuple[int, int]:
    """`(non-zero parameters, parameters)`."""
    values = [w.numpy() for w in parameters(model)]
    return int(sum(np.count_nonzero(v) for v in values)), int(sum(v.size for v in values))
