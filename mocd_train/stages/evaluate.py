"""Stage `evaluate`: compare methods decoded on the same held-out prompts — one table, plots, a self-contained HTML
report and W&B runs (offline by default, one per method, grouped by the run).

    python recipes/evaluate.py --config recipes/smollm2-mini-hh/pipeline.yaml \
        --methods "[eval-rmod, eval-cd_uniform, eval-student-rmod]" --reference eval-pi_ref

Writes <run_dir>/eval/{report.html, comparison.json, table.md, *.png}.
"""

import json
import sys
from pathlib import Path

from mocd_train.atomic import atomic_dir
from mocd_train.cli import run_stage
from mocd_train.config import ConfigError
from mocd_train.evaluation import compare
from mocd_train.report import (
    claim_lines,
    log_wandb,
    plot_distributions,
    plot_methods,
    plot_pareto,
    plot_traces,
    table_rows,
    write_html,
)
from mocd_train.rewards import Normalizer, parse_objectives
from mocd_train.rundir import stage_dir
from mocd_train.stage import Stage
from mocd_train.wandb_report import save_or_publish, wandb_online


def load_method(run_dir, name):
    from datasets import load_from_disk

    path = stage_dir(run_dir, "teach") / name / "dataset"
    if not path.is_dir():
        raise ConfigError(f"method {name!r}: no teacher dataset at {path}; decode it with recipes/teach.py "
                          "--split heldout first.")
    return list(load_from_disk(str(path)))


def load_palette(run_dir, name):
    path = stage_dir(run_dir, "palette") / name / "palette.json"
    if not path.is_file():
        raise ConfigError(f"palette_targets: no palette {name!r} at {path}; solve it with recipes/solve_palette.py "
                          f"--name {name} first.")
    return json.loads(path.read_text())


def main(argv=None):
    # parse
    cfg, stage = Stage.open("evaluate", argv, lambda c: c.name, processes=False)
    names = [s.name for s in parse_objectives(cfg.objectives)]

    # load (and check everything before the old report is replaced)
    normalizer = Normalizer.load(stage_dir(cfg.run_dir, "rollouts") / "normalization.json")
    tables = {m: load_method(cfg.run_dir, m) for m in [cfg.reference] + [m for m in cfg.methods if m != cfg.reference]}
    for m, rows in tables.items():
        missing = [g for g in names if f"reward_{g}" not in rows[0]]
        if missing:
            raise ConfigError(f"method {m!r} was scored without {missing}; re-decode it with this run's objectives.")

    # compare + report
    missing = [b for b in cfg.baselines if b not in tables]
    if missing:
        raise ConfigError(f"baselines: {missing} are not among the methods {list(tables)}; add them to `methods`.")
    unknown = [m for ms in (cfg.fronts or {}).values() for m in ms if m not in tables]
    if unknown:
        raise ConfigError(f"fronts: {unknown} are not among the methods {list(tables)}; add them to `methods`.")
    unknown = [m for m in (cfg.palette_targets or {}) if m not in tables]
    if unknown:
        raise ConfigError(f"palette_targets: {unknown} are not among the methods {list(tables)}; "
                          "add them to `methods`.")
    palettes = {m: load_palette(cfg.run_dir, p) for m, p in (cfg.palette_targets or {}).items()}
    out = stage.start()
    comparison = compare(tables, cfg.reference, names, normalizer, cfg.baselines, cfg.fronts, palettes)
    rows = table_rows(comparison)
    plots = [plot_methods(comparison, out / "methods.png"), plot_pareto(comparison, out / "pareto.png"),
             plot_distributions(tables, names, normalizer, out / "distributions.png")]
    trace = plot_traces(tables, names, out / "rmod_trace.png")
    plots += [trace] if trace else []
    samples = {m: rows_[: cfg.samples] for m, rows_ in tables.items()}
    write_html(comparison, rows, plots, out / "report.html", f"{Path(cfg.run_dir).name}: comparison",
               samples, cfg.note)
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    (out / "table.md").write_text(header + "".join("| " + " | ".join(map(str, r.values())) + " |\n" for r in rows))
    (out / "claims.md").write_text("".join(f"- {line}\n" for line in claim_lines(comparison)))
    wandb_dirs = log_wandb(cfg, comparison, tables, plots) if cfg.report_to == "wandb" else []
    online = cfg.report_to == "wandb" and wandb_online()
    definition, url = save_or_publish(comparison, Path(cfg.run_dir).name, out, online)
    if cfg.export_dir:
        export(out, Path(cfg.export_dir), cfg)
    stage.finish({"report": str(out / "report.html"), "methods": list(tables), "wandb": wandb_dirs,
                  "wandb_report": url or str(definition), "pareto_front": comparison["pareto_front"],
                  "exported": cfg.export_dir})
    for warning in comparison["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print((out / "table.md").read_text())
    print((out / "claims.md").read_text())
    print(f"report → {out / 'report.html'}")
    if url:
        print(f"W&B Report → {url}")
    elif cfg.report_to == "wandb":
        print(f"W&B Report definition → {definition}; publish it once the runs are synced:\n"
              f"  wandb sync {Path(cfg.run_dir) / 'wandb'}/offline-run-* && mocd publish-report {definition}")
    return out


def export(out: Path, dest: Path, cfg) -> None:
    """The report's files, the value model's held-out metrics and the run's step timings, copied to `dest` (e.g.
    results/<preset>, committed with the code): generated by this stage, never typed by hand."""
    import shutil

    with atomic_dir(dest) as tmp:
        for f in sorted(out.iterdir()):
            if f.suffix in (".html", ".md", ".json", ".png") and f.name not in ("DONE.json", "config.yaml"):
                shutil.copy2(f, tmp / f.name)
        value_metrics = stage_dir(cfg.run_dir, "value") / "metrics.json"
        if value_metrics.is_file():
            shutil.copy2(value_metrics, tmp / "value_metrics.json")
        timings = Path(cfg.run_dir) / "pipeline.json"
        if timings.is_file():
            shutil.copy2(timings, tmp / "pipeline.json")


if __name__ == "__main__":
    run_stage(main)
