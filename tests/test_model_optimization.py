"""Both models can be wrapped by TF-MOT: prune the whole model, QAT on annotated Dense layers."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import models
from models.backend import keras
from models.layers import custom_objects

VOCAB = 24


def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, VOCAB, [16, 12]).astype(np.int32), rng.integers(0, VOCAB, [16, 12]).astype(np.int32)


def compile_(model):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))


@pytest.mark.slow
@pytest.mark.parametrize("family, overrides", [("transformer", {}), ("lstm", {"tie_embeddings": True})])
def test_prune_whole_model_train_strip(family, overrides):
    config = models.make_config(family, "tiny", vocab_size=VOCAB, **overrides)
    model = models.build(config)
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    compile_(pruned)
    x, y = data()
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    sparsity = {w.name: float(np.mean(w.numpy() == 0)) for w in stripped.weights}
    pruned_names = [n for n, s in sparsity.items() if abs(s - 0.5) < 0.02]
    assert any("token_embedding" in n for n in pruned_names)
    expected = ["block0_query", "block0_key", "block0_value", "block0_attention_output", "block0_mlp_in"] \
        if family == "transformer" else ["rnn0/lstm_cell/kernel", "rnn0/lstm_cell/recurrent_kernel", "projection"]
    for name in expected:
        assert any(name in n for n in pruned_names), (name, sparsity)
    assert stripped(x).shape == (16, 12, VOCAB)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["transformer", "lstm"])
def test_qat_on_annotated_dense_layers(family):
    config = models.make_config(family, "tiny", vocab_size=VOCAB)
    model = models.build(config)
    quantize = tfmot.quantization.keras
    with quantize.quantize_scope(custom_objects()):
        annotated = keras.models.clone_model(
            model, clone_function=lambda l: quantize.quantize_annotate_layer(l)
            if isinstance(l, keras.layers.Dense) else l)
        qat = quantize.quantize_apply(annotated)
    wrapped = [l.layer.name for l in qat.layers if isinstance(l, quantize.QuantizeWrapperV2)]
    dense = [l.name for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert dense and set(dense) <= set(wrapped)  # TF-MOT may also wrap a layer feeding one
    compile_(qat)
    x, y = data()
    history = qat.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert qat(x).shape == (16, 12, VOCAB)
