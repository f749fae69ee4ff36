"""A text classifier on a language model's backbone: the transfer-learning model of lmstack.

    token ids [B, T] (right-padded with [PAD]) -> the LM's layers up to its last
    hidden state (transformer: `final_ln`; LSTM: the top recurrent layer's output)
    -> pooling over the real tokens ('last' or 'mean') -> dropout -> Dense -> logits [B, C]

Both language models are causal, so with right padding every real position's
hidden state is the same as without padding: 'last' reads the state at the
final real token, which has seen the whole text.

The backbone is a nested functional model made of the LM's own layers under
their own names, so the pre-trained weights load by restoring the LM's
checkpoint into the LM they came from (`backbone(lm, config)`), and freezing a
layer is finding it by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from models import gpt, layers, lstm
from models.backend import keras

POOLINGS = ("mean", "last")
PAD_ID = 0  # pipelines.tokenizers.PAD_ID; models must not import pipelines


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a classifier.

    Attributes:
        backbone: the language model's config (GPTConfig or LSTMConfig).
        num_classes: output classes.
        pooling: 'last' (state at the final real token) or 'mean' (over the real tokens).
        dropout: before the head.
        max_length: tokens read per text (the transformer's context at most).
    """
    backbone: Any
    num_classes: int
    pooling: str = "mean"
    dropout: float = 0.1
    max_length: int = 128

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: a classifier needs at least 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a fraction in [0, 1)")
        context = self.backbone.seq_len if isinstance(self.backbone, gpt.GPTConfig) else None
        if self.max_length < 2 or (context is not None and self.max_length > context):
            raise ValueError(f"max_length={self.max_length}: expected 2.."
                             + (f"{context} (the transformer's context)" if context else "any"))

    def num_layers(self) -> int:
        return self.backbone.layers


def feature_layer(config) -> str:
    """The name of the LM layer whose output is the backbone's hidden state `[B, T, d]`."""
    if isinstance(config, gpt.GPTConfig):
        return "final_ln"
    return f"rnn{config.layers - 1}_dropout"


def backbone(lm: keras.Model, config) -> keras.Model:
    """The LM's layers from its token ids to its last hidden state, sharing its weights."""
    return keras.Model(lm.input, layers.get_layer(lm, feature_layer(config)).output, name="backbone")


def bottom_layers(config, count: int) -> list[str]:
    """Names of the embeddings and the lowest `count` blocks (or recurrent layers) of a backbone."""
    if isinstance(config, gpt.GPTConfig):
        names = ["token_embedding"] + (["position_embedding"] if config.positions == "learned" else [])
        absent = gpt.Block.unused(config) | {"attention_dropout", "mlp_dropout"}
        block = ["attention"] + [f.name for f in dataclasses.fields(gpt.Block) if f.name not in absent]
        return names + [f"block{i}_{part}" for i in range(count) for part in block]
    return ["token_embedding"] + [f"rnn{i}" for i in range(count)]


class SequencePooling(keras.layers.Layer):
    """Pools hidden states `[B, T, d]` over the real (non-[PAD]) tokens of `ids [B, T]` -> `[B, d]`.

    Args:
        mode: 'last' (the final real token's state) or 'mean'.
        pad_id: the padding id.
    """

    def __init__(self, mode: str = "mean", pad_id: int = PAD_ID, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self.pad_id = pad_id

    def call(self, inputs):
        states, ids = inputs  # (B, T, d), (B, T)
        real = tf.cast(tf.not_equal(ids, self.pad_id), states.dtype)  # (B, T)
        if self.mode == "mean":
            total = tf.reduce_sum(states * real[:, :, tf.newaxis], axis=1)  # (B, d)
            return total / tf.maximum(tf.reduce_sum(real, axis=1, keepdims=True), 1.0)
        last = tf.maximum(tf.cast(tf.reduce_sum(real, axis=1), tf.int32) - 1, 0)  # (B,)
        return tf.gather(states, last, batch_dims=1)  # (B, d)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "pad_id": self.pad_id}


def build_classifier(config: ClassifierConfig, lm: keras.Model | None = None) -> keras.Model:
    """The classifier: int32 ids `[B, T]` -> float32 logits `[B, num_classes]`.

    Args:
        config: the shape.
        lm: the language model whose layers (and weights) the backbone uses; None builds a new one.
    """
    if lm is None:
        lm = gpt.build_gpt(config.backbone) if isinstance(config.backbone, gpt.GPTConfig) \
            else lstm.build_lstm(config.backbone)
    ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    states = backbone(lm, config.backbone)(ids)  # (B, T, d)
    pooled = SequencePooling(config.pooling, name="pooling")([states, ids])  # (B, d)
    pooled = keras.layers.Dropout(config.dropout, name="head_dropout")(pooled)
    logits = keras.layers.Dense(config.num_classes, dtype="float32", name="head")(pooled)  # (B, C)
    return keras.Model(ids, logits, name="classifier")
