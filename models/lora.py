"""LoRA (Hu et al. 2021): low-rank adapters on the transformer's Dense kernels, and their merge.

A targeted projection computes `x W + b + (alpha / rank) * (x A) B`, where W and b
are the trained weights, frozen, and only A `[in, rank]` and B `[rank, out]` train.
B starts at zero, so a new adapter leaves the model as it was. The adapted layer
is a `Dense` with two more weights: it keeps its name and its place among the
model's layers, so a checkpoint of the plain model restores into it (the
adapters keep their initial values) and `GPTDecoder` runs it unchanged.

`merge` folds the adapters into the kernels, `W + (alpha / rank) A B`: the
plain model every stage after training sees (`checkpoints.load_model`), so
TF-MOT, TensorFlow Serving and the device get an ordinary model.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from models.backend import keras

# What `lora_targets` may name: a group, or one projection of every block.
GROUPS = {"attention": ("query", "key", "value", "attention_output"), "mlp": ("mlp_gate", "mlp_in", "mlp_out")}
PROJECTIONS = tuple(p for group in GROUPS.values() for p in group)


def projections(targets) -> tuple[str, ...]:
    """The block fields (`query`, `mlp_in`, ...) that `targets` (groups or fields) name.

    Raises:
        ValueError: a name that is neither a group nor a projection.
    """
    names = []
    for target in targets:
        if target in GROUPS:
            names += GROUPS[target]
        elif target in PROJECTIONS:
            names.append(target)
        else:
            raise ValueError(f"lora_targets: {target!r} names no layer; use {', '.join(GROUPS)} or "
                             f"{', '.join(PROJECTIONS)}")
    return tuple(dict.fromkeys(names))


class LoRADense(keras.layers.Dense):
    """`Dense` with a frozen kernel and bias and a trainable low-rank update.

    Args:
        rank: the adapters' inner width.
        alpha: the update is scaled by alpha / rank.
        **kwargs: `Dense`'s.
    """

    def __init__(self, units, rank: int, alpha: float, **kwargs):
        super().__init__(units, **kwargs)
        self.rank = rank
        self.alpha = alpha

    def build(self, input_shape):
        fan_in = int(input_shape[-1])
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: fan_in})
        # The trained weights under Dense's names (a plain model's checkpoint restores into them), frozen.
        self.kernel = self.add_weight("kernel", shape=[fan_in, self.units], initializer=self.kernel_initializer,
                                      trainable=False)
        self.bias = self.add_weight("bias", shape=[self.units], initializer=self.bias_initializer,
                                    trainable=False) if self.use_bias else None
        # PEFT's initialization: A as a Linear layer's default (Kaiming uniform, a = sqrt(5)), B zero.
        self.lora_a = self.add_weight("lora_a", shape=[fan_in, self.rank],
                                      initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"))
        self.lora_b = self.add_weight("lora_b", shape=[self.rank, self.units], initializer="zeros")
        self.built = True

    def call(self, inputs):
        dtype = inputs.dtype
        out = tf.matmul(inputs, tf.cast(self.kernel, dtype))
        if self.use_bias:
            out += tf.cast(self.bias, dtype)
        update = tf.matmul(tf.matmul(inputs, tf.cast(self.lora_a, dtype)), tf.cast(self.lora_b, dtype))
        return self.activation(out + tf.cast(self.alpha / self.rank, dtype) * update)

    def merged_kernel(self) -> tf.Tensor:
        return self.kernel + (self.alpha / self.rank) * tf.matmul(self.lora_a, self.lora_b)

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "alpha": self.alpha}


def freeze_all_but_adapters(model: keras.Model) -> None:
    """Every layer but the adapted ones stops training (the adapted ones train only A and B)."""
    for layer in model.layers:
        if not isinstance(layer, LoRADense):
            layer.trainable = False


def plain_config(config):
    """The config without adapters: the model a merge makes."""
    if not getattr(config, "lora_rank", 0):
        return config
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.name.startswith("lora_")}
    return dataclasses.replace(config, **defaults)


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies a model's weights into another of the same layers with adapters added or merged away.

    Layers are matched by name, nested models (a classifier's backbone) included: an adapted
    layer into a plain one gives its merged kernel; a plain one into an adapted one gives its kernel
    and bias, the adapters keeping their initial values.
    """
    for layer in target.layers:
        origin = source.get_layer(layer.name)
        if isinstance(layer, keras.Model):
            copy_weights(origin, layer)
        elif isinstance(origin, LoRADense) and not isinstance(layer, LoRADense):
            layer.set_weights([origin.merged_kernel().numpy()] + ([origin.bias.numpy()] if origin.use_bias else []))
        elif isinstance(layer, LoRADense) and not isinstance(origin, LoRADense):
            layer.kernel.assign(origin.kernel)
            if layer.use_bias:
                layer.bias.assign(origin.bias)
        elif layer.weights:
            layer.set_weights(origin.get_weights())


def merge(model: keras.Model, config) -> tuple[keras.Model, object]:
    """The plain model of an adapted one: the same weights with each update folded into its kernel.

    Returns:
        `(model, config without LoRA)`; a model without adapters comes back as it is.
    """
    if not getattr(config, "lora_rank", 0):
        return model, config
    import models  # the builders (models/__init__.py imports this module's users)

    plain = models.build(plain_config(config))
    copy_weights(model, plain)
    return plain, plain_config(config)


def adapt(model: keras.Model, config, rank: int, alpha: float | None, targets) -> tuple[keras.Model, object]:
    """A plain model with new adapters (`merge`'s inverse): `(model, config with LoRA)`.

    Raises:
        ValueError: a rank below 1 or targets that name no layer.
    """
    import models

    adapted_config = dataclasses.replace(config, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))
    if rank < 1:
        raise ValueError(f"lora_rank={rank} must be at least 1")
    adapted = models.build(adapted_config)
    copy_weights(model, adapted)
    return adapted, adapted_config
