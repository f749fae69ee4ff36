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


def define_flags(fv: flags.FlagValues) -> None:
    d = flags
    d.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    d.DEFINE_string("method", None, "prune | qat | prune_qat | cluster", flag_values=fv)
    d.DEFINE_integer("steps", 300, "fine-tuning steps", flag_values=fv)
    d.DEFINE_string("name", "", "the variant's name (default from the method: pruned50, qat, pruned50-qat, "
                    "cluster16)", flag_values=fv)
    d.DEFINE_string("from_variant", "", "start from this variant instead of the trained model "
                    "(prune_qat: a pruned variant; default the only one)", flag_values=fv)
    d.DEFINE_float("target_sparsity", 0.5, "prune: fraction of each pruned weight set to zero, in [0, 1)",
                   flag_values=fv)
    d.DEFINE_string("schedule", "polynomial", "prune: polynomial (ramp from 0) | constant", flag_values=fv)
    d.DEFINE_integer("begin_step", 0, "prune: first pruning step", flag_values=fv)
    d.DEFINE_integer("end_step", 0, "prune: step the polynomial schedule reaches the target (0: ~70% of "
                     "--steps)", flag_values=fv)
    d.DEFINE_integer("frequency", 0, "prune: steps between mask updates (0: --steps / 20)", flag_values=fv)
    d.DEFINE_string("sparsity_m_by_n", "", "prune: M,N keeps M non-zeros in every N weights, e.g. 2,4",
                    flag_values=fv)
    d.DEFINE_integer("clusters", 16, "cluster: distinct values per clustered weight", flag_values=fv)
    d.DEFINE_float("learning_rate", 2e-4, "fine-tuning learning rate", flag_values=fv)
    d.DEFINE_integer("batch_size", 0, "sequences per step (0: the run's training batch size)", flag_values=fv)
    d.DEFINE_boolean("overwrite", False, "replace an existing variant of the same name", flag_values=fv)
    d.DEFINE_integer("seed", 0, "data order", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "method"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import optimize
    from pipelines.progress import Progress

    config = optimize.OptimizeConfig(
        method=fv.method, steps=fv.steps, name=fv.name, from_variant=fv.from_variant,
        target_sparsity=fv.target_sparsity, schedule=fv.schedule, begin_step=fv.begin_step,
        end_step=fv.end_step, frequency=fv.frequency, sparsity_m_by_n=fv.sparsity_m_by_n,
        clusters=fv.clusters, learning_rate=fv.learning_rate, batch_size=fv.batch_size,
        overwrite=fv.overwrite, seed=fv.seed)
    summary = optimize.optimize(fv.workdir, config, progress=Progress(sys.stderr),
                                verbose=1 if sys.stderr.isatty() else 2)
    print(optimize.describe(summary), file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("variant", "path", "perplexity", "bits_per_char", "sparsity",
                                              "nonzero_params", "params", "perplexity_change")}))
    return 0
