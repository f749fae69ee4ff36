"""The device runtime: an lmstack .tflite file run the way an app on a phone or board runs it.

Needs ai-edge-litert and numpy, never TensorFlow (`tests/test_edge_tokenizer.py` checks):

    runtime.py    EdgeModel (generation: prefill/decode, step) and EdgeClassifier; the sampling rule in numpy
    tokenizer.py  the training tokenizer's ids and text, read from the file's packed files
    metadata.py   TFLite Metadata: the file's description and the files packed after it
"""

from serving.edge.runtime import FORMAT, SIDECAR, EdgeClassifier, EdgeModel, choose, uniform_noise

__all__ = ["FORMAT", "SIDECAR", "EdgeClassifier", "EdgeModel", "choose", "uniform_noise"]
