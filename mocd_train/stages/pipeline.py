"""The whole pipeline of a setup, end to end: every step of the `pipeline:` list in its pipeline file, in order —
rollouts → value → palette → policies → teachers → distillation → evaluation on the embedded default.

    python recipes/pipeline.py --config recipes/smollm2-mini-hh/pipeline.yaml
    python recipes/pipeline.py --config recipes/smollm2-mini-hh/pipeline.yaml --run_dir runs/mine --report_to none

A step whose output is complete is skipped and a partial one resumes (each stage's own rule), so re-running after an
interruption redoes only what is missing. Command-line keys (`--run_dir`, `--seed`, `--report_to`, `--device`, ...)
apply to every step; "{run_dir}" in a step's value is replaced by the run directory, and "{best:<eval>:<param>}" by
a decoder parameter chosen on an earlier evaluation (`substitute`). Writes <run_dir>/pipeline.json with each step's
wall time.
"""

import importlib
import json
import time
from pathlib import Path

import yaml

from mocd_train.cli import run_stage
from mocd_train.config import BEST, CommonConfig, parse_overrides, pipeline_steps, read_yaml, stage_values
from mocd_train.errors import ConfigError
from mocd_train.rundir import atomic_write_json


def stage_module(stage: str):
    """The entry point of a stage: mocd_train.stages.<stage> (imported when its step runs: stages are heavy)."""
    return importlib.import_module(f"mocd_train.stages.{stage}")


def substitute(value, run_dir: Path):
    """A step's value with "{run_dir}" replaced, and "{best:<evaluation>:<param>}" replaced by that decoder parameter
    of the method with the highest mean per-prompt worst case in <run_dir>/<evaluation>/comparison.json (the
    reference excluded): how a preset picks, e.g., RMOD's κ on a validation slice before decoding the test prompts."""
    if not isinstance(value, str):
        return value
    match = BEST.match(value)
    if match is None:
        return value.replace("{run_dir}", str(run_dir))
    evaluation, param = match.groups()
    path = run_dir / evaluation / "comparison.json"
    if not path.is_file():
        raise ConfigError(f"{value}: no {path}; an earlier step must evaluate {evaluation!r} first.")
    comparison = json.loads(path.read_text())
    methods = {m: e for m, e in comparison["methods"].items() if m != comparison["reference"] and param in e["params"]}
    if not methods:
        raise ConfigError(f"{value}: no method in {path} has the decoder parameter {param!r}.")
    best = max(methods, key=lambda m: methods[m]["mean_worst_case"])
    print(f"{value} → {methods[best]['params'][param]!r} (from {best}, mean worst case "
          f"{methods[best]['mean_worst_case']:+.3f})", flush=True)
    return methods[best]["params"][param]


def as_args(values: dict) -> list[str]:
    return [a for k, v in values.items()
            for a in (f"--{k}", v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip())]


def main(argv=None):
    import sys

    config, overrides = parse_overrides(sys.argv[1:] if argv is None else argv)
    if config is None:
        raise ConfigError("--config: name a pipeline file, e.g. recipes/smollm2-mini-hh/pipeline.yaml.")
    shared = set(CommonConfig.__dataclass_fields__)
    bad = sorted(set(overrides) - shared)
    if bad:
        raise ConfigError(f"pipeline overrides apply to every step, so only shared keys are allowed "
                          f"({', '.join(sorted(shared))}); got {bad}.")
    steps = pipeline_steps(read_yaml(config), config)
    run_dir = Path(overrides.get("run_dir") or read_yaml(config).get("run_dir", "runs/default"))
    overrides = {**overrides, "run_dir": str(run_dir)}  # every step, stage files included, writes to this run
    timings = []
    t_all = time.perf_counter()
    for i, (stage, step_config, extra) in enumerate(steps):
        label = extra.get("name") or (Path(step_config).stem if step_config != config else stage)
        print(f"\n=== [{i + 1}/{len(steps)}] {stage}: {label} ===", flush=True)
        t0 = time.perf_counter()
        extra = {k: substitute(v, run_dir) for k, v in extra.items()}
        stage_module(stage).main(["--config", step_config, *as_args(extra), *as_args(overrides)])
        timings.append({"step": i + 1, "stage": stage, "label": label, "seconds": round(time.perf_counter() - t0, 1)})
        atomic_write_json(run_dir / "pipeline.json", {"config": config, "steps": timings,
                                                      "seconds": round(time.perf_counter() - t_all, 1)})
    total = time.perf_counter() - t_all
    for stage, step_config, extra in steps:  # exported results carry the timings of the whole run
        export_dir = extra.get("export_dir") or (stage == "evaluate" and stage_values(
            read_yaml(step_config), "evaluate", step_config).get("export_dir"))
        if stage == "evaluate" and export_dir and Path(export_dir).is_dir():
            atomic_write_json(Path(export_dir) / "pipeline.json", json.loads((run_dir / "pipeline.json").read_text()))
    print("\n" + "\n".join(f"{t['step']:>2}. {t['stage']:<9} {t['label']:<28} {t['seconds']:>7.1f} s" for t in timings))
    print(f"pipeline done in {total / 60:.1f} min → {run_dir}")
    return json.loads((run_dir / "pipeline.json").read_text())


if __name__ == "__main__":
    run_stage(main)
