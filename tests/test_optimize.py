"""`lmstack optimize`: TF-MOT variants of a trained tiny model, and every later stage on them."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from app.main import main
from pipelines import checkpoints, evaluate, mot, optimize
from pipelines import workdir as workdir_lib
from pipelines.generate import TextGenerator
from serving import contract as c
from serving.exporters import savedmodel
from tests.helpers import run_cli, tiny_export

# Short fine-tunes: the polynomial schedule reaches its target at step 8 and trains 4 more, each step
# over two accumulated batches of 4 (TF-MOT's wrappers inside the accumulating step).
PRUNE = dict(steps=12, frequency=2, end_step=8, batch_size=4, grad_accum_steps=2)
# What each family must have pruned (weight names as in `mot.weight_report`).
PRUNED = {
    "transformer": ["token_embedding/embeddings", "block0_query/kernel", "block0_key/kernel", "block0_value/kernel",
                    "block0_attention_output/kernel", "block0_mlp_in/kernel", "block0_mlp_out/kernel",
                    "block1_query/kernel", "block1_mlp_out/kernel"],
    "lstm": ["token_embedding/embeddings", "rnn0/kernel", "rnn0/recurrent_kernel", "rnn1/kernel",
             "rnn1/recurrent_kernel", "logits/kernel"],
}
_RUNS: dict = {}


@pytest.fixture(scope="module", params=["transformer", pytest.param("lstm", marks=pytest.mark.slow)])
def run(request, tmp_path_factory, english_text):
    """(family, workdir with a trained tiny model and its `pruned50` variant)."""
    family = request.param
    if family not in _RUNS:
        workdir, _ = tiny_export(family, tmp_path_factory, english_text)  # shares the trained model
        optimize.optimize(workdir, optimize.OptimizeConfig("prune", target_sparsity=0.5, **PRUNE), verbose=0)
        _RUNS[family] = workdir
    return family, _RUNS[family]


def weights_of(variant_dir):
    model, _, _ = checkpoints.load_model(variant_dir)
    return model, {row["weight"]: row for row in mot.weight_report(model)}


def test_prune_reaches_the_target_on_every_prunable_weight(run):
    family, workdir = run
    variant = workdir / "optimized" / "pruned50"
    metrics = workdir_lib.read_json(variant / "metrics.json")
    model, weights = weights_of(variant)
    assert mot.wrappers(model) == []  # stripped: a plain model that models.build restores
    pruned = {row["weight"] for row in metrics["weights"] if row["pruned"]}
    assert set(PRUNED[family]) <= pruned
    for name in pruned:
        assert weights[name]["sparsity"] == pytest.approx(0.5, abs=0.01), name
    assert weights["position_embedding/positions" if family == "transformer" else "rnn0/kernel"]["size"]
    assert metrics["nonzero_params"] < 0.6 * metrics["params"]
    # The figures are the saved model's: evaluating the variant again gives the same perplexity.
    again = evaluate.evaluate(workdir, variant="pruned50")
    assert again["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    assert np.isfinite(metrics["baseline"]["perplexity"]) and (variant / "logs").is_dir()


def test_prune_qat_keeps_the_zeros_and_quantizes_the_dense_layers(run):
    family, workdir = run
    summary = optimize.optimize(workdir, optimize.OptimizeConfig("prune_qat", steps=6, batch_size=8), verbose=0)
    assert summary["variant"] == "pruned50-qat"
    model, weights = weights_of(workdir / "optimized" / "pruned50-qat")
    wrapped = mot.wrappers(model)
    assert wrapped and all(name.startswith("quant_") for name in wrapped)
    for name in PRUNED[family]:  # including the float embedding and LSTM kernels, which stay frozen
        assert weights[name]["sparsity"] == pytest.approx(0.5, abs=0.01), name
    assert "token_embedding" in summary["float_layers"]
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_qat_and_cluster(run):
    family, workdir = run
    if family == "lstm":
        pytest.skip("QAT and clustering wrap the same Dense-centred layers in both families; prune_qat covers the LSTM")
    qat = optimize.optimize(workdir, optimize.OptimizeConfig("qat", steps=6, batch_size=8), verbose=0)
    model, _ = weights_of(workdir / "optimized" / "qat")
    dense = "block0_query" if family == "transformer" else "logits"
    assert f"quant_{dense}" in mot.wrappers(model)
    assert "token_embedding" in qat["float_layers"]
    assert evaluate.evaluate(workdir, variant="qat")["perplexity"] == pytest.approx(qat["perplexity"], rel=1e-5)

    optimize.optimize(workdir, optimize.OptimizeConfig("cluster", steps=6, clusters=8, batch_size=8), verbose=0)
    model, weights = weights_of(workdir / "optimized" / "cluster8")
    assert mot.wrappers(model) == []
    for name in PRUNED[family]:
        assert weights[name]["distinct"] <= 8, name


def test_a_pruned_variant_exports_and_generates(run, tmp_path):
    family, workdir = run
    if family == "lstm":
        pytest.skip("the export is family-independent; the transformer covers it")
    path = savedmodel.export(workdir, savedmodel.ExportConfig(variant="pruned50", export_base=str(tmp_path / "lm")))
    loaded = tf.saved_model.load(str(path))
    out = loaded.signatures[c.SERVING_DEFAULT](prompt=tf.constant(["ROMEO."]),
                                               max_new_tokens=tf.constant([8], tf.int32))
    expected = TextGenerator(workdir, variant="pruned50").generate(["ROMEO."], 8)
    assert out["completion"].numpy()[0].decode() == expected[0]
    info = workdir_lib.read_json(path / c.ASSETS_EXTRA / c.CONFIG_FILE)
    assert info["variant"] == "pruned50"


@pytest.mark.slow
def test_m_by_n_sparsity(run):
    family, workdir = run
    if family == "lstm":
        pytest.skip("M-by-N structure applies to Dense kernels; the transformer has more of them")
    optimize.optimize(workdir, optimize.OptimizeConfig("prune", sparsity_m_by_n="2,4", **PRUNE), verbose=0)
    model, _ = weights_of(workdir / "optimized" / "pruned2by4")
    kernel = model.get_layer("block0_mlp_in").kernel.numpy()  # (d, 4d): groups of 4 along the input axis
    groups = np.moveaxis(kernel, 0, -1).reshape(-1, 4)
    assert (np.count_nonzero(groups, axis=1) <= 2).all()


@pytest.mark.parametrize("argv, message", [
    (["--method=prune", "--target_sparsity=1.0"], "must be in [0, 1)"),
    (["--method=prune", "--target_sparsity=-0.1"], "must be in [0, 1)"),
    (["--method=distill"], "--method=distill: value should be one of <prune|qat|prune_qat|cluster>"),
    (["--method=qat", "--from_variant=nope"], "no optimized variant 'nope'"),
    (["--method=prune_qat", "--from_variant=cluster-none"], "no optimized variant"),
    (["--method=prune", "--steps=10", "--end_step=7", "--frequency=2"],
     "--end_step=7: end_step - begin_step=0 is not a multiple of frequency=2"),
    (["--method=prune", "--sparsity_m_by_n=4,2"], "0 < M < N"),
    (["--method=prune", "--name=pruned50"], "exists"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, capsys, argv, message):
    _, workdir = run
    before = sorted(p.name for p in (workdir / "optimized").iterdir())
    code, _, err = run_cli(capsys, "optimize", f"--workdir={workdir}", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (workdir / "optimized").iterdir()) == before


def test_needs_a_trained_model_and_a_pruned_variant(capsys, tmp_path, english_text):
    from pipelines import prepare, tokenizers

    (tmp_path / "c.txt").write_text(english_text, encoding="utf-8")
    prepare.prepare(prepare.PrepareConfig(corpus=(str(tmp_path / "c.txt"),),
                                          tokenizer=tokenizers.TokenizerConfig("char")), tmp_path / "run")
    code, _, err = run_cli(capsys, "optimize", f"--workdir={tmp_path / 'run'}", "--method=prune")
    assert code == 2 and "no trained model" in err
    code, _, err = run_cli(capsys, "optimize", f"--workdir={tmp_path / 'run'}", "--method=prune_qat")
    assert code == 2 and "run `lmstack optimize --method=prune` first" in err
    assert not (tmp_path / "run" / "optimized").exists()


def test_report_compares_every_variant(run, capsys, tmp_path):
    family, shared = run
    if family == "lstm":
        pytest.skip("the report is family-independent")
    # A copy with the dense model and two variants (each row costs a SavedModel and a latency
    # run), whatever other tests of this session have added to the shared workdir.
    workdir = tmp_path / "run"
    shutil.copytree(shared, workdir, ignore=shutil.ignore_patterns("tflite", "export", "report"))
    for variant in (workdir / "optimized").iterdir():
        if variant.name not in ("pruned50", "pruned50-qat"):
            shutil.rmtree(variant)
    with pytest.raises(SystemExit) as e:
        main(["report", f"--workdir={workdir}"])
    code = e.value.code
    out, err = capsys.readouterr()
    assert code == 0
    assert json.loads(out) == {"path": str(workdir / "report" / "report.md"),
                               "rows": workdir_lib.read_json(workdir / "report" / "report.json")}
    report = (workdir / "report" / "report.md").read_text()
    rows = workdir_lib.read_json(workdir / "report" / "report.json")
    names = [r["variant"] for r in rows]
    assert names == ["dense", "pruned50", "pruned50-qat"]
    for row in rows:
        assert row["gzip_bytes"] < row["saved_model_bytes"] and row["ms_per_token"] > 0
        assert f"| {row['variant']} |" in err and f"| {row['variant']} |" in report
    pruned = next(r for r in rows if r["variant"] == "pruned50")
    dense = rows[0]
    assert pruned["nonzero_params"] < 0.6 * dense["nonzero_params"]
    assert pruned["gzip_bytes"] < dense["gzip_bytes"]  # zeros compress
    for png in ("size_vs_quality.png", "loss_curves.png"):
        assert (workdir / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report


def test_tf_mot_wraps_llamas_block():
    # Llama's block (rotary positions, RMSNorm, gated MLP, grouped-query attention, untied output):
    # every kernel pruned, every Dense layer quantized, the kernels clustered; a QAT model decodes
    # with its cache as it runs whole.
    import models
    from models.backend import keras

    config = models.make_config("transformer", "llama-tiny", vocab_size=24, tie_embeddings=False)
    keras.utils.set_random_seed(0)
    model = models.build(config)
    ids = np.random.default_rng(0).integers(0, 24, [2, 12]).astype(np.int32)
    pruned = mot.prune(model, mot.pruning_schedule("constant", 0.5, 0, 10, 1))
    kernels = [f"block{i}_{name}/kernel" for i in range(2)
               for name in ("query", "key", "value", "attention_output", "mlp_gate", "mlp_in", "mlp_out")]
    assert set(kernels + ["token_embedding/embeddings", "logits/kernel"]) == set(mot.pruned_weight_names(pruned))
    quantized = mot.quantize(model)
    assert set(mot.float_layers(quantized)) == {"token_embedding", "final_ln"} | {
        f"block{i}_{norm}" for i in range(2) for norm in ("ln1", "ln2")}
    decoder = models.decoder(quantized, config)
    logits, _ = decoder.call_with_cache(ids, decoder.init_cache(2, config.seq_len), 0)
    np.testing.assert_allclose(logits.numpy(), quantized(ids).numpy(), atol=1e-5)
    clustered = mot.strip(mot.cluster(model, 4))
    assert all(np.unique(clustered.get_layer(f"block0_{name}").kernel.numpy()).size <= 4
               for name in ("query", "mlp_gate", "mlp_out"))
