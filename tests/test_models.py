"""The shared harness: the same checks over both model families (STYLE.md, habit 9)."""

import numpy as np
import pytest
import tensorflow as tf

import models
from models import decoding, gpt, layers, samplers
from models.backend import keras
from models.layers import custom_objects

VOCAB = 24
T = 12

# The two families get every check; the transformer's other block (Llama's) also
# the decoding ones (`decodes`: rotary positions per row), and every variant (tied
# or untied output, GRU cell, activations, bias kinds) the structural ones
# (`any_variant`), which is where they differ.
FAMILIES = {
    "gpt": ("transformer", "tiny", {}),
    "lstm": ("lstm", "tiny", {}),
}
DECODERS = {**FAMILIES, "llama": ("transformer", "llama-tiny", {})}
VARIANTS = {
    **DECODERS,
    "lstm_tied": ("lstm", "tiny", {"tie_embeddings": True}),
    "gru": ("lstm", "tiny", {"cell": "gru"}),
    "gpt_tanh_gelu": ("transformer", "tiny", {"activation": "gelu_tanh"}),  # GPT-2's (lmstack import)
    # Qwen's biases, Gemma's GeGLU, an untied output, full multi-head attention with rotary positions.
    "llama_untied_qkv_bias": ("transformer", "llama-tiny", {"tie_embeddings": False, "bias": "qkv", "kv_heads": 2}),
    "llama_geglu": ("transformer", "llama-tiny", {"activation": "gelu_tanh", "heads": 4, "kv_heads": 2}),
}


def _build(name):
    family, preset, overrides = VARIANTS[name]
    keras.utils.set_random_seed(0)
    config = models.make_config(family, preset, vocab_size=VOCAB, **overrides)
    return config, models.build(config)


@pytest.fixture(params=list(FAMILIES), scope="module")
def built(request):
    return _build(request.param)


@pytest.fixture(params=list(DECODERS), scope="module")
def decodes(request):
    return _build(request.param)


@pytest.fixture(params=list(VARIANTS), scope="module")
def any_variant(request):
    return _build(request.param)


def random_ids(batch=3, length=T, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=[batch, length]).astype(np.int32)


def test_shapes_and_parameter_count(any_variant):
    config, model = any_variant
    logits = model(random_ids())
    assert logits.shape == (3, T, VOCAB) and logits.dtype == tf.float32
    assert model.count_params() == models.stats(config)["params"]
    assert models.stats(config)["flops_per_token"] > 2 * (model.count_params() - VOCAB * 32) * 0.5


def test_causality(any_variant):
    _, model = any_variant
    ids = random_ids(batch=1)
    changed = ids.copy()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB
    a, b = model(ids).numpy(), model(changed).numpy()
    np.testing.assert_allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not np.allclose(a[0, 7:], b[0, 7:])


def test_config_round_trip(any_variant):
    config, model = any_variant
    assert models.config_from_json(models.config_to_json(config)) == config
    clone = keras.Model.from_config(model.get_config(), custom_objects=custom_objects())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(random_ids()).numpy(), model(random_ids()).numpy(), atol=1e-6)


def test_cached_decoding_equals_full_recomputation(any_variant):
    config, model = any_variant
    ids = random_ids(batch=2, length=T)
    full = model(ids).numpy()
    decoder = models.decoder(model, config)
    cache = decoder.init_cache(2, config.seq_len)
    logits, cache = decoder.call_with_cache(ids[:, :5], cache, 0)  # prefill, then one token at a time
    steps = [logits.numpy()]
    for t in range(5, T):
        logits, cache = decoder.call_with_cache(ids[:, t:t + 1], cache, t)
        steps.append(logits.numpy())
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4)


def test_a_cache_write_of_every_position_equals_the_placed_write():
    # write_cache returns the update itself when it fills the whole cache (the TFLite prefill's case):
    # it must equal the one-hot placement it skips, which a dynamic update length still takes.
    rng = np.random.default_rng(0)
    old = tf.constant(rng.normal(size=[2, 2, 8, 4]).astype(np.float32))
    update = tf.constant(rng.normal(size=[2, 2, 8, 4]).astype(np.float32))
    placed = tf.function(gpt.write_cache, input_signature=[
        tf.TensorSpec([2, 2, 8, 4]), tf.TensorSpec([2, 2, None, 4]), tf.TensorSpec([None], tf.int32)])
    expected = placed(old, update, tf.range(8)).numpy()
    np.testing.assert_allclose(gpt.write_cache(old, update, tf.range(8)).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(expected, update.numpy(), atol=1e-6)
    partial = placed(old, update[:, :, :3], tf.range(5, 8)).numpy()  # the general path still places
    np.testing.assert_allclose(partial[:, :, 5:], update.numpy()[:, :, :3], atol=1e-6)
    np.testing.assert_allclose(partial[:, :, :5], old.numpy()[:, :, :5], atol=1e-6)


def test_blocked_attention_equals_one_masked_attention():
    # T=64 splits into 4 query blocks of 16 (the path training at seq_len >= 64 takes);
    # blocks=1 is the plain masked attention over all positions.
    rng = np.random.default_rng(0)
    q, k, v = (tf.constant(rng.normal(size=[2, 64, 32]).astype(np.float32)) for _ in range(3))
    target = tf.constant(rng.normal(size=[2, 64, 32]).astype(np.float32))
    results = []
    for blocks in (4, 1):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = layers.causal_self_attention(q, k, v, num_heads=4, blocks=blocks)
            loss = tf.reduce_sum(out * target)
        results.append([out, *tape.gradient(loss, [q, k, v])])
    for blocked, plain in zip(*results):
        np.testing.assert_allclose(blocked.numpy(), plain.numpy(), atol=1e-5)


def test_static_length_model_equals_cached_decoding():
    # A model built for a static length 64 runs the blocked attention; the decoder runs
    # the plain one over its cache: the logits must agree, and stay causal.
    config = models.make_config("transformer", "tiny", vocab_size=VOCAB, seq_len=64)
    keras.utils.set_random_seed(0)
    model = models.build(config, seq_len=64)
    ids = random_ids(batch=2, length=64)
    full = model(ids).numpy()
    decoder = models.decoder(model, config)
    logits, _ = decoder.call_with_cache(ids, decoder.init_cache(2), 0)
    np.testing.assert_allclose(logits.numpy(), full, atol=1e-4)
    changed = ids.copy()
    changed[:, 40:] = (changed[:, 40:] + 1) % VOCAB
    np.testing.assert_allclose(model(changed).numpy()[:, :40], full[:, :40], atol=1e-6)


def test_fit_on_tf_data_lowers_the_loss(built):
    config, _ = built
    model = models.build(config)  # a fresh copy: training must not disturb the other checks
    # A learnable stream: the next token is the current one plus one.
    start = np.random.default_rng(1).integers(0, VOCAB, size=[64, 1])
    seq = (start + np.arange(T + 1)[None, :]) % VOCAB
    ds = tf.data.Dataset.from_tensor_slices((seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32))).batch(16)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model.evaluate(ds, verbose=0)
    model.fit(ds.repeat(), steps_per_epoch=30, epochs=1, verbose=0)
    assert model.evaluate(ds, verbose=0) < before * 0.7


@pytest.mark.slow
def test_save_and_load(built, tmp_path):
    config, model = built
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, custom_objects=custom_objects())
    np.testing.assert_allclose(loaded(random_ids()).numpy(), model(random_ids()).numpy(), atol=1e-6)
    tf.saved_model.save(model, str(tmp_path / "saved"))
    restored = tf.saved_model.load(str(tmp_path / "saved"))
    out = restored.signatures["serving_default"](token_ids=tf.constant(random_ids()))
    np.testing.assert_allclose(list(out.values())[0].numpy(), model(random_ids()).numpy(), atol=1e-5)


@pytest.mark.slow
def test_batched_prompts_of_different_lengths_match_one_by_one(decodes):
    config, model = decodes
    generator = decoding.Generator(models.decoder(model, config))
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11], [12]]
    for sampler in (samplers.SamplerConfig(), samplers.SamplerConfig("top_p", temperature=2.0, seed=3)):
        batch = generator.generate(prompts, 6, sampler)
        alone = [generator.generate([p], 6, sampler)[0] for p in prompts]
        streamed = [list(generator.stream(p, 6, sampler)) for p in prompts]
        assert batch == alone == streamed
        assert all(len(row) == 6 for row in batch)


@pytest.mark.slow
def test_samplers_are_seeded(built):
    config, model = built
    generator = decoding.Generator(models.decoder(model, config))
    prompts = [[3, 4], [5, 6, 7]]

    def run(name, seed):
        return generator.generate(prompts, 8, samplers.SamplerConfig(name, temperature=2.0, top_k=8, seed=seed))

    for name in ("top_k", "top_p", "random"):
        assert run(name, 5) == run(name, 5)
        assert run(name, 5) != run(name, 6)


def test_one_sampling_rule_in_tensorflow_under_xla_and_on_the_device():
    """`sample_next` (TensorFlow, uncompiled and XLA) and `serving.edge.choose` (numpy) pick the same tokens."""
    from serving import edge

    rng = np.random.default_rng(0)
    logits = rng.normal(size=[6, 50]).astype(np.float32) * 3
    temperature = np.array([0.0, 1.0, 0.7, 1.5, 1.0, 2.0], np.float32)
    top_k = np.array([0, 0, 5, 0, 1, 10], np.int32)
    top_p = np.array([1.0, 1.0, 1.0, 0.8, 1.0, 0.5], np.float32)
    for position in (0, 7, 1000):
        seed = rng.integers(0, 2**31 - 1, size=6).astype(np.int32)
        args = [tf.constant(v) for v in (logits, position, temperature, top_k, top_p, seed)]
        plain = samplers.sample_next(*args).numpy()
        compiled = tf.function(samplers.sample_next, jit_compile=True)(*args).numpy()
        device = [edge.choose(logits[i], position, temperature[i], top_k[i], top_p[i], int(seed[i]))
                  for i in range(6)]
        np.testing.assert_array_equal(compiled, plain)
        np.testing.assert_array_equal(device, plain)
        assert plain[0] == logits[0].argmax() and plain[4] == logits[4].argmax()  # greedy, and top_k=1
    # The noise is uniform: draws over many positions follow the distribution (temperature 1, no cut).
    probabilities = tf.nn.softmax(logits[1]).numpy()
    draws = [edge.choose(logits[1], p, 1.0, 0, 1.0, 42) for p in range(4000)]
    counts = np.bincount(draws, minlength=50) / 4000
    assert np.abs(counts - probabilities).max() < 0.03


def test_stop_tokens_end_a_row(built):
    config, model = built
    generator = decoding.Generator(models.decoder(model, config))
    greedy = generator.generate([[3, 4, 5]], 6)[0]
    stop = greedy[2]
    cut = generator.generate([[3, 4, 5]], 6, stop_token_ids=[stop])[0]
    assert cut == greedy[:greedy.index(stop)]


def test_rows_at_their_own_positions_continue_as_generate_does(decodes):
    # A server's step path (start_rows, then continue_rows a few steps at a time, each row at its
    # own position) must make generate's tokens: greedy, prompts of three lengths.
    config, model = decodes
    decoder = models.decoder(model, config)
    prompts, new = [[1, 5, 7], [2], [4, 4, 9, 4, 4]], 7
    expected = decoding.Generator(decoder).generate(prompts, new)
    lengths = tf.constant([len(p) for p in prompts], tf.int32)
    tokens = tf.constant([p + [0] * (5 - len(p)) for p in prompts], tf.int32)
    sampling = samplers.Sampling.greedy(3)
    token, cache = decoding.start_rows(decoder, tokens, lengths, config.seq_len, sampling)
    made, positions = [[t] for t in token.numpy().tolist()], lengths
    for steps in (3, 3):
        out, count, cache = decoding.continue_rows(decoder, token, positions, cache, tf.fill([3], steps), sampling,
                                                   stop_token_id=-1)
        for row, tokens_made, c in zip(made, out.numpy(), count.numpy()):
            row += tokens_made[:c].tolist()
        token, positions = tf.constant([row[-1] for row in made]), positions + count
    assert made == expected

@pytest.mark.parametrize("depth", [2, 8])
def test_gpt2_initialization_shrinks_the_residual_projections_with_depth(depth):
    # An option (`init='gpt2'`); the default stays Keras's Glorot, which trained better at the small budget.
    # GPT-2's recipe: N(0, 0.02) for every matrix, N(0, 0.02 / sqrt(2 * layers)) for the two that write
    # into the residual stream, so the stream's variance at init does not grow with depth.
    keras.utils.set_random_seed(0)
    config = models.make_config("transformer", "small", vocab_size=VOCAB, layers=depth, d_model=256, heads=4,
                                init="gpt2")
    model = models.build(config)
    std = lambda name: float(np.std(model.get_layer(name).kernel.numpy()))
    for name in ("block0_query", "block0_mlp_in", f"block{depth - 1}_value"):
        assert std(name) == pytest.approx(0.02, rel=0.05)
    for name in ("block0_attention_output", f"block{depth - 1}_mlp_out"):
        assert std(name) == pytest.approx(0.02 / np.sqrt(2 * depth), rel=0.05)
    assert not np.any(model.get_layer("block0_mlp_in").bias.numpy())
    default = models.build(models.make_config("transformer", "small", vocab_size=VOCAB, layers=depth))
    assert float(np.std(default.get_layer("block0_query").kernel.numpy())) > 0.05  # Keras's Glorot: measured better
    with pytest.raises(ValueError, match="init='xavier'"):
        models.make_config("transformer", "small", vocab_size=VOCAB, init="xavier")


def test_lstm_initialization_is_the_recipes():
    # What LSTM language models start from (Jozefowicz et al. 2015; Keras's defaults): forget-gate bias 1,
    # the recurrent kernel orthogonal. A change of Keras's defaults would show here.
    keras.utils.set_random_seed(0)
    config = models.make_config("lstm", "small", vocab_size=VOCAB)
    model = models.build(config)
    cell = model.get_layer("rnn0").cell
    units = config.units
    bias = cell.bias.numpy()
    assert np.all(bias[units:2 * units] == 1.0) and not np.any(bias[:units]) and not np.any(bias[2 * units:])
    recurrent = cell.recurrent_kernel.numpy()  # (units, 4 * units), the four gates side by side
    np.testing.assert_allclose(recurrent @ recurrent.T, np.eye(units), atol=1e-4)  # orthonormal rows


def test_gpt2_presets_have_gpt2s_parameter_and_flop_counts():
    gpt2 = models.make_config("transformer", "gpt2", vocab_size=50257)
    assert (gpt2.activation, gpt2.init, gpt2.seq_len) == ("gelu_tanh", "gpt2", 1024)
    assert gpt2.num_params() == 124_439_808  # Hugging Face's GPT2Model("gpt2")
    assert models.build(gpt2).count_params() == gpt2.num_params()
    medium = models.make_config("transformer", "gpt2-medium", vocab_size=50257)
    assert medium.num_params() == 354_823_168  # GPT2Model("gpt2-medium")
    for config in (gpt2, medium):  # nanoGPT's estimate_mfu: 6N + 12 L d T per trained token (N: no position table)
        n = config.num_params() - config.seq_len * config.d_model
        nanogpt = 6 * n + 12 * config.layers * config.d_model * config.seq_len
        assert abs(3 * config.flops_per_token() - nanogpt) / nanogpt < 2e-3


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_lora_adapters_start_as_the_model_and_merge_into_it(preset, tmp_path):
    from models import lora

    keras.utils.set_random_seed(0)
    base_config = models.make_config("transformer", preset, vocab_size=VOCAB)
    base = models.build(base_config)
    saved = tf.train.Checkpoint(model=base).save(str(tmp_path / "base"))
    config = models.make_config("transformer", preset, vocab_size=VOCAB, lora_rank=4, lora_alpha=8.0,
                                lora_targets=("attention", "mlp_out"))
    adapted = models.build(config)
    tf.train.Checkpoint(model=adapted).restore(saved).expect_partial()  # a plain checkpoint restores into it
    ids = random_ids()
    np.testing.assert_array_equal(adapted(ids).numpy(), base(ids).numpy())  # B = 0: the model as it was
    assert adapted.count_params() == models.stats(config)["params"] > base.count_params()
    lora.freeze_all_but_adapters(adapted)
    names = sorted(v.name.split(":")[0] for v in adapted.trainable_variables)
    assert names == sorted(f"block{i}_{p}/lora_{ab}" for i in range(2) for ab in "ab"
                           for p in ("query", "key", "value", "attention_output", "mlp_out"))
    for variable in adapted.trainable_variables:
        variable.assign(tf.random.normal(variable.shape, stddev=0.3, seed=1))
    merged, plain_config = lora.merge(adapted, config)
    assert plain_config == base_config and not np.allclose(adapted(ids).numpy(), base(ids).numpy(), atol=1e-3)
    np.testing.assert_allclose(merged(ids).numpy(), adapted(ids).numpy(), atol=1e-5)
    decoder = models.decoder(adapted, config)  # the cached decoder runs the adapted layers as they are
    logits, _ = decoder.call_with_cache(ids, decoder.init_cache(3, config.seq_len), 0)
    np.testing.assert_allclose(logits.numpy(), adapted(ids).numpy(), atol=1e-5)
    assert models.config_from_json(models.config_to_json(config)) == config


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_a_classifiers_bottom_layers_are_layers_of_the_backbone(preset):
    from models import classifier

    config = models.make_config("transformer", preset, vocab_size=VOCAB)
    model = models.build(config)
    names = classifier.bottom_layers(config, config.layers)
    weighted = {layer.name for layer in model.layers if layer.weights}
    assert {layer.name for layer in model.layers} >= set(names) and weighted <= set(names) | {"final_ln", "logits"}
