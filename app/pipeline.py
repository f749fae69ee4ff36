"""Run every stage of a run from one YAML or JSON config file; each stage is done once.

prepare → train → evaluate → optimize → export → serve → tflite → report, for
each model family the config names (WORKDIR/lstm, WORKDIR/transformer). A
stage already finished with the same inputs is not redone (WORKDIR/pipeline.json
keeps the fingerprints); change a setting and that stage and the ones after it
run again. Prints one line per stage, then a summary table (bits/char,
parameters, sizes, ms per token) and where every artifact lies.

example:
  lmstack pipeline --config=quickstart.yaml
  lmstack pipeline --config=quickstart.yaml --rerun=tflite --models=transformer
"""

from __future__ import annotations

import json
import sys

from absl import flags


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("config", None, "the run's YAML or JSON file (see quickstart.yaml)", flag_values=fv)
    flags.DEFINE_list("rerun", [], "stages to redo even if their inputs did not change", flag_values=fv)
    flags.DEFINE_list("skip", [], "stages to leave out (besides the config's `skip`)", flag_values=fv)
    flags.DEFINE_list("models", [], "model families to run (default: the config's)", flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    import dataclasses

    from app import pipeline_file, pipeline_run, pipeline_stages
    from pipelines.errors import UserError
    from pipelines.progress import Progress

    config = pipeline_file.load_config(fv.config)
    bad = [s for s in fv.skip if s not in pipeline_stages.STAGES]
    if bad:
        raise UserError(f"--skip: unknown stage(s) {', '.join(bad)}; stages are {', '.join(pipeline_stages.STAGES)}")
    config = dataclasses.replace(config, skip=tuple(dict.fromkeys(config.skip + tuple(fv.skip))))
    pipeline = pipeline_run.Pipeline(config, Progress(sys.stderr), rerun=tuple(fv.rerun), families=tuple(fv.models))
    summary = pipeline.run()
    print(f"\n{pipeline_run.summary_table(summary)}\n\nfinished in {summary['seconds']:.0f} s; "
          f"state in {config.workdir / pipeline_run.STATE_FILE}", file=sys.stderr)
    print(json.dumps({"workdir": summary["workdir"], "seconds": summary["seconds"]}))
    return 0
