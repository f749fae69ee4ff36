"""Fine-tune the trained model under TF-MOT into a slimmer variant.

--method=prune zeroes the smallest weights of every attention projection, MLP,
embedding and LSTM kernel (prune_low_magnitude, then strip_pruning);
--method=qat trains with 8-bit fake quantization on the Dense layers TF-MOT
supports; --method=prune_qat does QAT on a pruned variant and keeps its zeros;
--method=cluster makes each weight matrix share --clusters values. The variant
is written to WORKDIR/optimized/NAME with its metrics (validation perplexity
and bits/char next to the starting model's, sparsity per weight); later
commands take --variant=NAME.

example:
  lmstack optimize --workdir=runs/shakespeare --method=prune --target_sparsity=0.5 --steps=300
  lmstack optimize --workdir=runs/shakespeare --method=prune_qat --from_variant=pruned50 --steps=200
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import settings


def define_flags(fv: flags.FlagValues) -> None:
    from pipelines import optimize

    flags.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    settings.define(fv, optimize.OptimizeConfig)
    settings.define_progress(fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import optimize
    from pipelines.progress import Progress

    config = settings.build(fv, optimize.OptimizeConfig)
    summary = optimize.optimize(fv.workdir, config, progress=Progress(sys.stderr),
                                verbose=settings.keras_verbose(fv.progress))
    print(optimize.describe(summary), file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("variant", "path", "perplexity", "bits_per_char", "sparsity",
                                              "nonzero_params", "params", "perplexity_change")}))
    return 0
