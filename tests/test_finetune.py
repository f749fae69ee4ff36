"""`lmstack finetune`: a tiny pre-trained LM -> classifier -> evaluate -> export -> Classify over REST and gRPC."""

import bz2
import csv
import io
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

from pipelines import checkpoints, classifiers, evaluate, finetune, labelled, tokenizers
from serving import contract as c, server
from serving.exporters import classifier as classifier_export
from serving.exporters import savedmodel, tflite
from serving.server.versions import method_names
from tests.helpers import ROOT, run_cli, trained_workdir
from tests.test_serve import post, start

REVIEWS = ROOT / "data" / "reviews.csv.bz2"


def review_rows(count: int) -> list[dict]:
    """`count` bundled review snippets, alternating fresh and rotten."""
    rows = list(csv.DictReader(io.TextIOWrapper(bz2.open(REVIEWS), encoding="utf-8")))
    fresh = [r for r in rows if r["label"] == "fresh"]
    rotten = [r for r in rows if r["label"] == "rotten"]
    return [r for pair in zip(fresh, rotten) for r in pair][:count]


def write_csv(path: pathlib.Path, rows: list[dict], columns=("label", "text")) -> pathlib.Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, english_text):
    return trained_workdir(tmp_path_factory.mktemp("base"), english_text, "transformer")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    return write_csv(path, review_rows(160))


def tiny_config(base, examples, **overrides) -> finetune.FinetuneConfig:
    settings = dict(base=str(base), train=str(examples), steps=12, batch_size=8, warmup_steps=2, learning_rate=3e-3,
                    val_fraction=0.25, dropout=0.0)
    return finetune.FinetuneConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, base, examples):
    workdir = tmp_path_factory.mktemp("cls") / "reviews"
    summary = finetune.finetune(workdir, tiny_config(base, examples, baseline=True), verbose=0)
    return workdir, summary


def test_finetune_writes_a_classifier_workdir_with_metrics_and_a_baseline(classifier):
    workdir, summary = classifier
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["labels"] == ["fresh", "rotten"]
    assert metrics["examples"] == 40 and np.sum(metrics["confusion"]) == 40  # 25% of 160, per class
    assert metrics["per_class"]["fresh"]["support"] == metrics["per_class"]["rotten"]["support"] == 20
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["init"] == "pretrained"
    assert metrics["baseline"]["accuracy"] == pytest.approx(metrics["accuracy"] - metrics["accuracy_gain"])
    baseline = json.loads((workdir / finetune.BASELINE_DIR / "metrics.json").read_text())
    assert baseline["init"] == "scratch" and baseline["freeze"] == "none"
    assert (workdir / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in workdir.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_evaluate_agrees_with_finetune_and_scores_a_new_file(classifier, tmp_path):
    workdir, summary = classifier
    result = evaluate.evaluate_classifier(workdir)
    assert result["accuracy"] == pytest.approx(summary["accuracy"])
    assert result["confusion"] == summary["confusion"]
    # A JSONL file with the same columns, labels of both classes.
    rows = review_rows(300)[200:230]
    path = tmp_path / "more.jsonl.gz"
    import gzip
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
    other = evaluate.evaluate_classifier(workdir, corpus=[str(path)])
    assert other["examples"] == 30 and np.sum(other["confusion"]) == 30
    assert json.loads((workdir / "metrics.json").read_text())["evaluation"]["examples"] == 30


def test_exported_signatures_match_the_keras_model(classifier):
    workdir, _ = classifier
    path = savedmodel.export(workdir, savedmodel.ExportConfig(model_name="reviews"))
    assert method_names(path)[c.CLASSIFY] == c.CLASSIFY_METHOD
    assert method_names(path)[c.SERVING_DEFAULT] == c.PREDICT_METHOD
    texts = ["A dark, dull thriller.", "Funny, warm and wise.", "x"]
    model, config, labels, _ = classifiers.load_classifier(workdir)
    from pipelines import tokenizers
    expected = classifiers.predict_ids(model, tokenizers.load(workdir / "tokenizer"), texts, config.max_length)

    loaded = tf.saved_model.load(str(path))
    out = loaded.signatures[c.SERVING_DEFAULT](text=tf.constant(texts))
    np.testing.assert_allclose(out[c.SCORES].numpy(), expected, atol=1e-5)
    assert [x.decode() for x in out[c.LABEL].numpy()] == [labels[i] for i in expected.argmax(axis=1)]
    out = loaded.signatures[c.CLASSIFY](inputs=tf.constant([classifier_export.example(t) for t in texts]))
    np.testing.assert_allclose(out[c.SCORES].numpy(), expected, atol=1e-5)
    assert out[c.CLASSES].numpy().tolist() == [[b"fresh", b"rotten"]] * 3


def test_tflite_classifier_scores_like_the_keras_model_on_the_device_runtime(classifier, capsys, tmp_path):
    """`lmstack tflite` on a classifier workdir: token ids in (a batch of 4, the last call padded), the
    Keras model's scores out, in ai-edge-litert; int8 within 0.05 of them."""
    from pipelines import tokenizers
    from serving import edge
    from serving.edge import metadata as tflite_metadata

    workdir, _ = classifier
    texts = ["A dark, dull thriller.", "Funny, warm and wise.", "x", "The best film of the year.", ""]
    model, config, labels, _ = classifiers.load_classifier(workdir)
    tokenizer = tokenizers.load(workdir / "tokenizer")
    expected = classifiers.predict_ids(model, tokenizer, texts, config.max_length)
    code, out, err = run_cli(capsys, "tflite", f"--workdir={workdir}", "--batch_size=4")
    assert code == 0 and "classes: fresh, rotten" in err
    path = pathlib.Path(json.loads(out)["path"])
    lone = tmp_path / path.name  # what the app ships: the .tflite alone
    shutil.copy(path, lone)
    device = edge.EdgeClassifier(lone)
    ids = [device.tokenizer.encode(t) for t in texts]  # the tokenizer packed in the file
    assert ids == [tokenizer.tokenize(t).numpy().tolist() for t in texts]
    np.testing.assert_allclose(device.scores(ids), expected, atol=1e-5)
    assert device.classify_texts(texts) == [labels[i] for i in np.argmax(expected, axis=-1)]
    # Its TFLite Metadata: the labels file on the scores tensor, as the Task Library reads it.
    scores = tflite_metadata.read(lone.read_bytes()).metadata["subgraph_metadata"][0]["output_tensor_metadata"][0]
    assert scores["name"] == "scores" and scores["associated_files"][0]["type"] == tflite_metadata.TENSOR_AXIS_LABELS
    packed = tflite_metadata.read(lone.read_bytes()).files
    assert packed[scores["associated_files"][0]["name"]].decode().splitlines() == labels
    with pytest.raises(ValueError, match="use EdgeClassifier"):
        edge.EdgeModel(device.path)
    classify = device.interpreter.get_signature_runner("classify").get_input_details()
    assert device.labels == labels and list(classify["tokens"]["shape"]) == [4, config.max_length]
    int8 = edge.EdgeClassifier(tflite.convert(workdir, tflite.TFLiteConfig(quantize="int8")))
    assert np.abs(int8.scores(ids) - expected).max() < 0.05  # 8-bit activations: close, not equal
    assert pathlib.Path(int8.path).stat().st_size < lone.stat().st_size / 2
    for flag, message in (("--variant=x", "no optimized variants"), ("--max_seq_len=8", "is for language models")):
        code, _, err = run_cli(capsys, "tflite", f"--workdir={workdir}", flag)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def serving_classifier(classifier):
    workdir, _ = classifier
    base = workdir / "export" / "reviews"
    if not base.exists():
        savedmodel.export(workdir, savedmodel.ExportConfig(model_name="reviews"))
    core = server.ModelServer({"reviews": server.ServedModel("reviews", base)})
    core.refresh()
    grpc_server, rest_server, grpc_target, rest_target = start(core)
    yield {"grpc": grpc_target, "rest": rest_target, "path": base / "1", "core": core}
    rest_server.shutdown()
    grpc_server.stop(None)


def test_classify_over_rest_and_grpc_as_tensorflow_serving_answers(serving_classifier):
    import grpc
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

    texts = ["A dark, dull thriller.", "Funny, warm and wise."]
    loaded = tf.saved_model.load(str(serving_classifier["path"]))
    expected = loaded.signatures[c.SERVING_DEFAULT](text=tf.constant(texts))[c.SCORES].numpy()
    url = f"http://{serving_classifier['rest']}/v1/models/reviews"

    status, body = post(f"{url}:classify", json.dumps(
        {"signature_name": "classify", "examples": [{"text": t} for t in texts]}).encode())
    assert status == 200, body
    assert [[pair[0] for pair in row] for row in body["result"]] == [["fresh", "rotten"]] * 2
    np.testing.assert_allclose([[pair[1] for pair in row] for row in body["result"]], expected, atol=1e-5)

    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(serving_classifier["grpc"]))
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "reviews"
    request.model_spec.signature_name = "classify"
    for t in texts:
        request.input.example_list.examples.add().features.feature["text"].bytes_list.value.append(t.encode())
    response = stub.Classify(request, timeout=30)
    assert response.model_spec.version.value == 1
    got = [[(k.label, k.score) for k in row.classes] for row in response.result.classifications]
    assert [[label for label, _ in row] for row in got] == [["fresh", "rotten"]] * 2
    np.testing.assert_allclose([[score for _, score in row] for row in got], expected, atol=1e-5)

    # lmstack's own clients speak the same API.
    from serving import client as client_lib
    for protocol in ("rest", "grpc"):
        target = serving_classifier["rest" if protocol == "rest" else "grpc"]
        pairs = client_lib.connect(target, protocol, model_name="reviews").classify(texts)
        np.testing.assert_allclose([[score for _, score in row] for row in pairs], expected, atol=1e-5)

    # Plain predict clients: serving_default, text -> label + scores.
    status, body = post(f"{url}:predict", json.dumps({"instances": texts}).encode())
    assert status == 200 and [p["label"] for p in body["predictions"]] == \
        [["fresh", "rotten"][i] for i in expected.argmax(axis=1)]


def test_lmstack_client_classifies_a_prompt(serving_classifier, capsys):
    from app.main import main

    for protocol in ("grpc", "rest"):
        with pytest.raises(SystemExit) as e:
            main(["client", f"--target={serving_classifier[protocol]}", f"--protocol={protocol}",
                  "--model_name=reviews", "--classify", "--prompt=Funny, warm and wise."])
        answer = json.loads(capsys.readouterr().out)
        assert e.value.code == 0 and answer["label"] in ("fresh", "rotten")
        assert set(answer["scores"]) == {"fresh", "rotten"} and sum(answer["scores"].values()) == pytest.approx(1.0)
        assert answer["label"] == max(answer["scores"], key=answer["scores"].get)


def test_bad_classify_requests_get_tensorflow_serving_errors(serving_classifier):
    import grpc
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

    metrics = serving_classifier["core"].metrics

    def counted(status):
        return metrics.request_count.value("reviews", status)

    before = counted("OK"), counted("INVALID_ARGUMENT"), metrics.request_latency.count("reviews", "Classify", "GRPC")
    url = f"http://{serving_classifier['rest']}/v1/models/reviews:classify"
    # TF Serving checks method names only with --enable_signature_method_name_check.
    serving_classifier["core"].method_name_check = True
    try:
        status, body = post(url, json.dumps({"examples": [{"text": "Fine."}]}).encode())  # serving_default: predict
    finally:
        serving_classifier["core"].method_name_check = False
    assert status == 400 and "Expected classification signature method_name" in body["error"]
    status, body = post(url, json.dumps({"signature_name": "classify", "examples": []}).encode())
    assert status == 400 and "examples" in body["error"]
    status, body = post(url, json.dumps({"signature_name": "nope", "examples": [{"text": "a"}]}).encode())
    assert status == 400 and "No signature was found with the name: nope" in body["error"]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(serving_classifier["grpc"]))
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "reviews"
    request.model_spec.signature_name = "classify"
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Input is empty" in e.value.details()
    still = {"signature_name": "classify", "examples": [{"text": "still serving"}]}
    status, body = post(url, json.dumps(still).encode())
    assert status == 200 and len(body["result"]) == 1
    request.input.example_list.examples.add().features.feature["text"].bytes_list.value.append(b"Fine.")
    assert len(stub.Classify(request, timeout=30).result.classifications) == 1
    # Counted by status, and the successful ones timed per API and entry point, as TensorFlow Serving does.
    after = counted("OK"), counted("INVALID_ARGUMENT"), metrics.request_latency.count("reviews", "Classify", "GRPC")
    assert after[0] == before[0] + 2 and after[1] >= before[1] + 1 and after[2] == before[2] + 1


def _weights(model) -> dict[str, np.ndarray]:
    return {w.name: w.numpy() for w in model.weights}


def test_freezing_really_freezes(base, examples, tmp_path):
    lm, _, _ = checkpoints.load_model(base)
    before = {w.name: w.numpy() for w in lm.weights}
    finetune.finetune(tmp_path / "all", tiny_config(base, examples, freeze="all", steps=6), verbose=0)
    model, *_ = classifiers.load_classifier(tmp_path / "all")
    backbone = model.get_layer("backbone")
    for w in backbone.weights:
        np.testing.assert_array_equal(w.numpy(), before[w.name], err_msg=w.name)
    assert not np.allclose(model.get_layer("head").kernel.numpy(), 0.0)

    finetune.finetune(tmp_path / "one", tiny_config(base, examples, freeze="1", steps=6), verbose=0)
    model, *_ = classifiers.load_classifier(tmp_path / "one")
    changed = {w.name for w in model.get_layer("backbone").weights if not np.array_equal(w.numpy(), before[w.name])}
    assert not any(n.startswith(("token_embedding", "position_embedding", "block0_")) for n in changed), changed
    assert any(n.startswith("block1_") for n in changed) and any(n.startswith("final_ln") for n in changed)


def test_lora_trains_the_adapters_and_the_head_and_exports_merged(base, examples, tmp_path):
    lm, _, _ = checkpoints.load_model(base)
    before = {w.name: w.numpy() for w in lm.weights}
    summary = finetune.finetune(tmp_path / "lora", tiny_config(base, examples, lora_rank=4, steps=6), verbose=0)
    assert summary["trainable_params"] < summary["params"] // 4
    model, config, labels, _ = classifiers.load_classifier(tmp_path / "lora")  # merged: a plain backbone
    assert config.backbone.lora_rank == 0 and not any("lora" in w.name for w in model.weights)
    backbone = {w.name: w.numpy() for w in model.get_layer("backbone").weights}
    adapted = [f"block{i}_{p}/kernel:0" for i in range(2) for p in ("query", "attention_output", "mlp_in")]
    assert all(not np.allclose(backbone[n], before[n]) for n in adapted)  # the adapters, merged in
    kept = [n for n in backbone if n not in adapted and not n.startswith(tuple(f"block{i}_" for i in range(2)))]
    for n in kept + [n for n in backbone if n.endswith("bias:0")]:
        np.testing.assert_array_equal(backbone[n], before[n], err_msg=n)  # embeddings, norms, biases: frozen
    # The training run's own scores are the merged model's.
    val = classifiers.read_split(tmp_path / "lora", "val")
    tokenizer = tokenizers.load(tmp_path / "lora" / "tokenizer")
    predicted = classifiers.predict_ids(model, tokenizer, list(val.texts), config.max_length).argmax(axis=1)
    assert np.mean(np.array(labels)[predicted] == np.array(val.labels)) == pytest.approx(summary["accuracy"])


def test_unfreeze_at_trains_the_backbone_after_the_head(base, examples, tmp_path):
    lm, _, _ = checkpoints.load_model(base)
    before = {w.name: w.numpy() for w in lm.weights}
    summary = finetune.finetune(tmp_path / "cls", tiny_config(base, examples, freeze="all", unfreeze_at=6, steps=10),
                                verbose=0)
    model, *_ = classifiers.load_classifier(tmp_path / "cls")
    assert any(not np.array_equal(w.numpy(), before[w.name]) for w in model.get_layer("backbone").weights)
    assert summary["unfreeze_at"] == 6
    assert summary["trainable_params_at_start"] < summary["trainable_params"] == summary["params"]


def test_labelled_files_read_csv_jsonl_and_compressed(tmp_path):
    rows = review_rows(6)
    plain = write_csv(tmp_path / "a.csv", rows)
    packed = tmp_path / "a.csv.bz2"
    packed.write_bytes(bz2.compress(plain.read_bytes()))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"review": r["text"], "stars": r["label"] == "fresh"}) + "\n" for r in rows))
    a, b = labelled.read(plain, "text", "label"), labelled.read(packed, "text", "label")
    assert a.texts == b.texts and a.labels == b.labels == ("fresh", "rotten") * 3
    j = labelled.read(jsonl, "review", "stars")
    assert j.texts == a.texts and j.labels == ("true", "false") * 3


@pytest.mark.parametrize("case, message", [
    ("unknown column", "no column 'review'"),
    ("one class", "a classifier needs at least two classes"),
    ("empty text", "empty text in column 'text'"),
    ("other family", "holds a transformer model, but model=lstm was asked for"),
    ("other tokenizer", "uses the char tokenizer, but tokenizer=byte was asked for"),
    ("untrained base", "has no trained model yet"),
    ("classifier base", "is a classifier workdir"),
    ("lora with freeze", "--lora_rank=4: trains adapters on the pre-trained backbone"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, base, examples, classifier, tmp_path, capsys):
    from app.main import main

    rows = review_rows(20)
    args = {"train": str(examples), "base": str(base), "text_column": "text"}
    if case == "unknown column":
        args["text_column"] = "review"
    elif case == "one class":
        args["train"] = str(write_csv(tmp_path / "one.csv", [r for r in rows if r["label"] == "fresh"]))
    elif case == "empty text":
        args["train"] = str(write_csv(tmp_path / "empty.csv", rows[:3] + [{"label": "fresh", "text": "  "}]))
    elif case == "other family":
        args["model"] = "lstm"
    elif case == "other tokenizer":
        args["tokenizer"] = "byte"
    elif case == "untrained base":
        untrained = tmp_path / "untrained"
        untrained.mkdir()
        for name in ("config.json", "data", "tokenizer"):
            src = base / name
            (untrained / name).write_text(src.read_text()) if src.is_file() else __import__("shutil").copytree(
                src, untrained / name)
        config = json.loads((untrained / "config.json").read_text())
        config.pop("model", None)
        (untrained / "config.json").write_text(json.dumps(config))
        args["base"] = str(untrained)
    elif case == "classifier base":
        args["base"] = str(classifier[0])
    elif case == "lora with freeze":
        args |= {"lora_rank": 4, "freeze": "all"}
    argv = ["finetune", f"--workdir={tmp_path / 'out'}", "--steps=5", "--warmup_steps=1"] + \
        [f"--{k}={v}" for k, v in args.items()]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_language_model_commands_refuse_a_classifier_workdir(classifier, capsys):
    from app.main import main

    with pytest.raises(SystemExit) as e:
        main(["generate", f"--workdir={classifier[0]}", "--prompt=The"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a classifier workdir" in err and len(err.strip().splitlines()) == 1


def test_a_killed_runs_staging_directory_is_removed_by_the_next(base, examples, tmp_path):
    stale = tmp_path / ".cls-staging-4194304-abcd"  # above Linux's largest pid_max: no such process
    stale.mkdir()
    (stale / "half-written").write_text("x")
    finetune.finetune(tmp_path / "cls", tiny_config(base, examples, steps=3, warmup_steps=1), verbose=0)
    assert not stale.exists() and (tmp_path / "cls" / "metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mirrored", "multi_worker"])
def test_finetune_runs_under_the_training_strategies(launcher, base, examples, tmp_path):
    import subprocess
    import sys

    common = [f"--workdir={tmp_path / 'cls'}", f"--base={base}", f"--train={examples}", "--steps=6",
              "--batch_size=4", "--progress=none", "--val_fraction=0.25"]  # the warmup derived from --steps
    if launcher == "mirrored":
        argv = [sys.executable, "-m", "app", "finetune", *common, "--strategy=mirrored", "--logical_cpus=2"]
    else:
        argv = [sys.executable, "-m", "app", "launch", "--workers=2", "--", "finetune", *common,
                "--strategy=multi_worker", "--batch_size=2", "--grad_accum_steps=2"]  # 2 workers x 2 x 2
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "cls" / "metrics.json").read_text())
    assert metrics["global_batch"] == 8 and metrics["examples"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls"]  # one workdir, written once, no staging


@pytest.mark.parametrize("family", ["transformer", "lstm"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_does_not_change_a_texts_logits(family, pooling):
    import models
    from models import classifier as classifier_lib

    config = classifier_lib.ClassifierConfig(models.make_config(family, "tiny", 20), 3, pooling, 0.0, 16)
    model = classifier_lib.build_classifier(config)
    ids = np.array([[3, 5, 6, 7, 0, 0, 0, 0], [3, 5, 6, 7, 8, 9, 10, 11]], np.int32)
    padded, alone = model(ids).numpy(), model(ids[:1, :4]).numpy()
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)
    assert not np.allclose(padded[0], padded[1])  # the longer text reads its own tokens
    layer = model.get_layer("pooling")
    assert classifier_lib.SequencePooling.from_config(layer.get_config()).get_config() == layer.get_config()
