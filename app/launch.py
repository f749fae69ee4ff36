"""Start N local worker processes of an lmstack command with a generated TF_CONFIG.

For developing and testing multi-worker training on one machine: each worker
gets TF_CONFIG with every worker on a free localhost port; output lines are
prefixed with [worker i]; if one worker dies, the others are stopped. On a
cluster, Kubeflow's TFJob sets TF_CONFIG instead (see deploy/).

example:
  lmstack launch --workers=2 -- train --workdir=runs/shk --model=transformer --strategy=multi_worker
"""

from __future__ import annotations

import sys

from absl import flags

TAKES_ARGUMENTS = True  # everything after `--` is the command to launch


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("workers", 2, "worker processes to start", flag_values=fv)


def run(fv: flags.FlagValues, argv: list[str]) -> int:
    from pipelines import launch

    return launch.launch(fv.workers, argv, out=sys.stdout)
