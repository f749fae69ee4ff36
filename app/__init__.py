"""lmstack's command line: absl flags -> config dataclasses -> one library call."""

import os

# Before TensorFlow is imported anywhere: models are tf_keras (Keras 2), which
# TF-MOT also requires (it sets this too, for the whole process), and TF's C++
# INFO lines are noise on a command line.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Host memory through TensorFlow's BFC allocator, which keeps freed buffers for
# reuse. With the default one, every XLA-compiled training step gets its
# temporaries as fresh pages from the OS and page-faults them in again: a
# quarter of the small transformer's step on 2 CPU cores (docs/results.md, "Training
# speed"). `TF_CPU_ALLOCATOR_USE_BFC=false` in the environment turns it off.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
