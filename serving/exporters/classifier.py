"""Export of a classifier workdir: text in, class scores out, for TensorFlow Serving's Predict and Classify APIs.

    EXPORT_BASE/VERSION/
      saved_model.pb, variables/   serving_default (text -> label, scores) and classify (tf.Example
                                   -> classes, scores; method name tensorflow/serving/classify)
      assets/                      the tokenizer's files
      assets.extra/                lmstack_config.json, tf_serving_warmup_requests (a PredictLog and a ClassifyLog)

`tf.saved_model.save` writes every signature with the Predict method name
(tensorflow/tensorflow#38081), and TensorFlow Serving's Classify RPC refuses
such a signature; so, once saved, the `classify` SignatureDef's method name is
set to tensorflow/serving/classify in saved_model.pb. The graph and its
tensors are untouched: TensorFlow's loader and tensorflow_model_server read
the file as any other.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import tensorflow as tf

from pipelines import classifiers
from serving import contract as c
from serving.exporters.module import ServedModule

WARMUP_TEXT = "A film."


def _spec(signature: str) -> list[tf.TensorSpec]:
    return [tf.TensorSpec([None], tf.string, name=name) for name in c.CLASSIFIER_SIGNATURES[signature].inputs]


class ClassifierModule(ServedModule):
    """The exported classifier: tokenizer + model + class names.

    Args:
        model: the classifier with its weights.
        max_length: tokens read per text.
        labels: class names in class-id order.
        tokenizer: the workdir's keras-nlp tokenizer.
        asset_files: tokenizer files to carry in assets/.
    """

    def __init__(self, model, max_length: int, labels: Sequence[str], tokenizer, asset_files: list[str]):
        super().__init__("lmstack_classifier", model)
        self.tokenizer = tokenizer
        self.tokenizer_assets = [tf.saved_model.Asset(f) for f in asset_files]
        self.labels = tf.constant(list(labels))
        self.max_length = max_length

    def _scores(self, text):
        ids = classifiers.encode(self.tokenizer, text, self.max_length)  # (B, L)
        return tf.nn.softmax(tf.cast(self.model(ids, training=False), tf.float32))  # (B, C)

    @tf.function(input_signature=_spec(c.SERVING_DEFAULT))
    def serving_default(self, text):
        scores = self._scores(text)
        return {c.LABEL: tf.gather(self.labels, tf.argmax(scores, axis=-1)), c.SCORES: scores}

    @tf.function(input_signature=_spec(c.CLASSIFY))
    def classify(self, inputs):
        """Serialized tf.Examples with a bytes feature `text` -> every class with its score."""
        features = tf.io.parse_example(inputs, {c.TEXT: tf.io.FixedLenFeature([], tf.string)})
        scores = self._scores(features[c.TEXT])
        classes = tf.tile(self.labels[tf.newaxis, :], [tf.shape(scores)[0], 1])  # (B, C)
        return {c.CLASSES: classes, c.SCORES: scores}

    def signatures(self) -> dict[str, Any]:
        return {name: getattr(self, name).get_concrete_function() for name in c.CLASSIFIER_SIGNATURES}


def example(text: str) -> bytes:
    """One serialized tf.Example with the `text` feature the classify signature reads."""
    feature = {c.TEXT: tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode("utf-8")]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def warmup_requests(model_name: str) -> list[bytes]:
    """A PredictLog for serving_default and a ClassifyLog for classify (TensorFlow Serving replays both)."""
    from tensorflow_serving.apis import classification_pb2, model_pb2, predict_pb2, prediction_log_pb2

    predict = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=c.SERVING_DEFAULT))
    predict.inputs[c.TEXT].CopyFrom(tf.make_tensor_proto([WARMUP_TEXT], dtype=tf.string))
    classify = classification_pb2.ClassificationRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=c.CLASSIFY))
    classify.input.example_list.examples.add().ParseFromString(example(WARMUP_TEXT))
    return [prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=predict))
            .SerializeToString(),
            prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=classify))
            .SerializeToString()]


def set_method_names(saved_model_dir: pathlib.Path, methods: dict[str, str]) -> None:
    """Rewrites the method name of the named SignatureDefs in saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = saved_model_dir / "saved_model.pb"
    saved = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved.meta_graphs:
        for name, method in methods.items():
            meta_graph.signature_def[name].method_name = method
    path.write_bytes(saved.SerializeToString())


def build(workdir: pathlib.Path, tokenizer, asset_files: list[str]) -> tuple[ClassifierModule, dict[str, Any]]:
    """The module of a classifier workdir and what lmstack_config.json says about it."""
    model, config, labels, step = classifiers.load_classifier(workdir)
    module = ClassifierModule(model, config.max_length, labels, tokenizer, asset_files)
    info = {"kind": "classifier", "checkpoint_step": step, "labels": labels,
            "classifier": classifiers.config_to_json(config, labels)}
    return module, info
