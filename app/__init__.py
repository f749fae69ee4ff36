"""lmstack's command line: absl flags -> config dataclasses -> one library call."""

import os

# Before TensorFlow is imported anywhere: models are tf_keras (Keras 2), which
# TF-MOT also requires (it sets this too, for the whole process), and TF's C++
# INFO lines are noise on a command line.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
