"""`serving.edge.metadata` and `serving.exporters.edge_metadata`: TFLite Metadata written and read back."""

import pytest
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema

from pipelines import tokenizers
from pipelines.tokenizers import TokenizerConfig
from serving.edge import metadata as md
from serving.exporters import edge_metadata, tflite


@pytest.fixture(scope="module")
def flat():
    """A small built-in-op TFLite file with a `classify` signature."""
    classify = tf.function(lambda tokens: {"scores": tf.nn.softmax(tf.cast(tokens[:, :2], tf.float32))},
                           input_signature=[tf.TensorSpec([1, 4], tf.int32, name="tokens")])
    return tflite.convert_functions({"classify": classify})


@pytest.mark.parametrize("kind, size, unit, field, name", [
    ("wordpiece", 200, "BertTokenizerOptions", "vocab_file", "vocabulary.txt"),
    ("sentencepiece", 100, "SentencePieceTokenizerOptions", "sentencePiece_model", "sentencepiece.model")])
def test_subword_tokenizers_get_the_schemas_tokenizer_unit(flat, tmp_path, english_text, kind, size, unit, field,
                                                           name):
    directory = tmp_path / kind
    directory.mkdir()
    tokenizers.learn(TokenizerConfig(kind, size), english_text.splitlines()[:300], directory)
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    info = {"family": "classifier", "backbone": "lstm", "labels": ["no", "yes"], "max_length": 4, "batch_size": 1,
            "tokenizer": tokenizers.load_config(directory), "eos_id": 3, "pad_id": 0, "quantize": "none",
            "checkpoint_step": 7, "signatures": {"classify": {"inputs": {}, "outputs": {}}}}
    out = edge_metadata.populate(flat, info, files)
    packed = md.read(out)
    graph = packed.metadata["subgraph_metadata"][0]
    [process_unit] = graph["input_process_units"]
    assert process_unit["options"][0] == unit
    [vocabulary] = process_unit["options"][1][field]
    assert vocabulary["name"] == name and packed.files[name] == files[name]
    assert packed.metadata["min_parser_version"] == "1.1.0"  # the schema's version with tokenizer units
    assert graph["output_tensor_metadata"][0]["associated_files"][0]["name"] == "labels.txt"
    assert packed.files["labels.txt"] == b"no\nyes\n"


def test_round_trip_replacing_and_refusing(flat):
    metadata = {"name": "m", "description": "d", "subgraph_metadata": [{
        "name": "classify", "input_tensor_metadata": [{"name": "tokens", "dimension_names": ["batch", "time"]}],
        "output_tensor_metadata": [{"name": "scores", "associated_files": [
            {"name": "labels.txt", "description": "one per line", "type": md.TENSOR_AXIS_LABELS}]}]}]}
    out = md.populate(flat, metadata, [md.File("labels.txt", b"a\nb\n")])
    assert md.read(out).metadata == {**metadata, "min_parser_version": "1.0.0"}
    again = md.populate(out, {**metadata, "name": "n"}, [md.File("labels.txt", b"a\nb\n")])
    model = schema.Model.GetRootAs(again, 0)
    names = [model.Metadata(i).Name() for i in range(model.MetadataLength())]
    assert names.count(md.METADATA_NAME.encode()) == 1 and md.read(again).metadata["name"] == "n"  # replaced
    assert model.BuffersLength() == schema.Model.GetRootAs(out, 0).BuffersLength()  # the old buffer reused
    with pytest.raises(ValueError, match="not packed: labels.txt"):
        md.populate(flat, metadata)
    assert md.read(flat) == md.Packed(None, {})
    with pytest.raises(ValueError, match="not TFLite metadata"):
        md.decode(b"\0" * 16)
