"""The W&B comparison Report of an evaluation: the table of methods, the claims, per-objective and worst-case panels
and the Pareto scatter over the evaluation's W&B runs (one per method, see `report.log_wandb`).

The definition is plain JSON (`report_definition`), written beside report.html by every evaluation, so a run made
offline can publish its Report later, once its runs are synced: `mocd publish-report <definition.json>`.
`build_report` turns it into a wandb-workspaces Report; `publish` saves it (needs a W&B login and the network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mocd_train.atomic import atomic_write_json
from mocd_train.report import claim_lines


def report_definition(comparison: dict, group: str, project: str | None = None, entity: str | None = None) -> dict:
    """Everything the Report shows, as JSON: which runs (the evaluation's W&B group), which panels, which text."""
    names = comparison["objectives"]
    panels = ([{"kind": "bar", "title": f"mean normalised {g}", "metrics": [f"mean/{g}"]} for g in names]
              + [{"kind": "bar", "title": "mean per-prompt worst case", "metrics": ["mean_worst_case"]},
                 {"kind": "bar", "title": "min over objectives of the means", "metrics": ["min_of_means"]},
                 {"kind": "bar", "title": "worst-case win rate vs the reference", "metrics": ["worst_case_win_rate"]},
                 {"kind": "bar", "title": "policy and value tokens per prompt",
                  "metrics": ["cost/policy_tokens_per_prompt", "cost/value_tokens_per_prompt"]}])
    if len(names) >= 2:
        panels.append({"kind": "scatter", "title": f"Pareto: {names[0]} vs {names[1]}", "x": f"mean/{names[0]}",
                       "y": f"mean/{names[1]}"})
    panels.append({"kind": "run_comparer", "title": "every summary metric, side by side"})
    header = "| method | " + " | ".join(names) + " | mean worst case | win rate vs reference |\n|---|" + \
        "---|" * (len(names) + 2) + "\n"
    rows = "".join(f"| {m} | " + " | ".join(f"{e['mean'][g]:+.3f}" for g in names)
                   + f" | {e['mean_worst_case']:+.3f} | {e['vs_reference']['worst_case_win_rate']:.2f} |\n"
                   for m, e in comparison["methods"].items())
    return {"title": f"{group}: comparison", "project": project or os.environ.get("WANDB_PROJECT", "mocd_train"),
            "entity": entity or os.environ.get("WANDB_ENTITY"), "group": group,
            "description": f"Held-out prompts; rewards normalised with π_ref's rollout statistics; reference "
                           f"{comparison['reference']}.",
            "methods": list(comparison["methods"]), "table": header + rows, "claims": claim_lines(comparison),
            "panels": panels}


def build_report(definition: dict):
    """The wandb-workspaces Report for a definition (no network needed to build it)."""
    import wandb_workspaces.reports.v2 as wr  # optional: pip install wandb-workspaces

    makers = {"bar": lambda p: wr.BarPlot(title=p["title"], metrics=p["metrics"]),
              "scatter": lambda p: wr.ScatterPlot(title=p["title"], x=p["x"], y=p["y"]),
              "run_comparer": lambda p: wr.RunComparer()}
    runset = wr.Runset(project=definition["project"], entity=definition["entity"] or "",
                       name=definition["group"], filters=f"Config('eval_group') = '{definition['group']}'")
    claims = "\n".join(f"- {line}" for line in definition["claims"])
    return wr.Report(project=definition["project"], entity=definition["entity"] or "", title=definition["title"],
                     description=definition["description"],
                     blocks=[wr.H1(definition["title"]), wr.MarkdownBlock(definition["table"]),
                             wr.H2("What is significant"), wr.MarkdownBlock(claims or "(no claims)"),
                             wr.PanelGrid(runsets=[runset], panels=[makers[p["kind"]](p)
                                                                    for p in definition["panels"]])])


def publish(definition: dict) -> str:
    """Save the Report to W&B; returns its URL."""
    report = build_report(definition)
    report.save()
    return report.url


def save_or_publish(comparison: dict, group: str, out: Path, online: bool) -> tuple[Path, str | None]:
    """Write the definition beside the HTML report; publish it too when W&B is online and logged in."""
    path = out / "wandb_report.json"
    definition = report_definition(comparison, group)
    atomic_write_json(path, definition)
    url = publish(definition) if online else None
    return path, url


def wandb_online() -> bool:
    """W&B is neither offline nor disabled, and an API key is configured (a login)."""
    if os.environ.get("WANDB_MODE", "offline") in ("offline", "disabled", "dryrun"):
        return False
    import wandb  # heavy

    return bool(wandb.api.api_key)


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
