"""The comparison report: one table, plots (PNG), a self-contained HTML page, and the same logged to W&B (offline
runs by default, one per method, grouped by the pipeline run)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from mocd_train.atomic import atomic_write_text

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
          "#64B5CD"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table_rows(comparison: dict) -> list[dict]:
    """One flat row per method (what the HTML table, the console and W&B show)."""
    names, out = comparison["objectives"], []
    for label, m in comparison["methods"].items():
        vs = m["vs_reference"]
        lo, hi = vs["worst_case_win_rate_ci"]
        row = {"method": label}
        row.update({f"{g} (norm.)": f"{m['mean'][g]:+.3f} ± {m['mean_se'][g]:.3f}" for g in names})
        row.update({f"{g} (raw)": f"{m['raw_mean'][g]:.3f}" for g in names})
        row["min of means"] = f"{m['min_of_means']:+.3f} ({m['min_of_means_objective']})"
        row["mean worst case"] = f"{m['mean_worst_case']:+.3f} ± {m['mean_worst_case_se']:.3f}"
        row["worst-case win rate vs ref"] = (f"{vs['worst_case_win_rate']:.2f} [{lo:.2f}, {hi:.2f}]"
                                             if label != comparison["reference"] else "—")
        row["policy tok/prompt"] = f"{m['cost']['policy_tokens_per_prompt']:.0f}"
        row["value tok/prompt"] = f"{m['cost']['value_tokens_per_prompt']:.0f}"
        row["s/prompt"] = f"{m['cost']['seconds_per_prompt']:.2f}"
        row["tok/s"] = f"{m['cost']['response_tokens_per_second']:.1f}"
        row["prompts"] = m["prompts"]
        out.append(row)
    return out


def plot_methods(comparison: dict, path: Path) -> Path:
    plt = _plt()
    names, labels = comparison["objectives"], list(comparison["methods"])
    series = names + ["min of means", "mean worst case"]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(labels) * len(series) / 2), 4.2))
    width = 0.8 / len(series)
    for j, s in enumerate(series):
        vals, errs = [], []
        for m in comparison["methods"].values():
            if s in names:
                vals.append(m["mean"][s]), errs.append(m["mean_se"][s])
            elif s == "min of means":
                vals.append(m["min_of_means"]), errs.append(0.0)
            else:
                vals.append(m["mean_worst_case"]), errs.append(m["mean_worst_case_se"])
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=s, color=COLORS[j % len(COLORS)])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("normalised reward (π_ref rollout z-score)")
    ax.set_title("Per-objective and worst-case reward by method (± SE over prompts)")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(comparison: dict, path: Path) -> Path:
    plt = _plt()
    names, labels = comparison["objectives"], list(comparison["methods"])
    gx, gy = names[0], names[1] if len(names) > 1 else names[0]
    fig, ax = plt.subplots(figsize=(6, 5))
    front = set(comparison["pareto_front"])
    for i, label in enumerate(labels):
        m = comparison["methods"][label]
        marker = "*" if label == comparison["reference"] else ("o" if label in front else "x")
        ax.errorbar(m["mean"][gx], m["mean"][gy], xerr=m["mean_se"][gx], yerr=m["mean_se"][gy], fmt=marker,
                    ms=10 if marker == "*" else 7, color=COLORS[i % len(COLORS)], capsize=2, label=label)
    pts = sorted([(comparison["methods"][m]["mean"][gx], comparison["methods"][m]["mean"][gy]) for m in front])
    if len(pts) > 1:
        ax.plot(*zip(*pts), color="gray", lw=1, ls="--", zorder=0)
    ax.set_xlabel(f"{gx} (normalised mean)")
    ax.set_ylabel(f"{gy} (normalised mean)")
    extra = f"\nhypervolume vs the reference: {comparison['hypervolume']:.4f}" if "hypervolume" in comparison else ""
    ax.set_title(f"Methods' mean rewards (o: Pareto front, x: dominated, *: reference){extra}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_traces(tables: dict[str, list[dict]], names: list[str], path: Path, prompts: int = 3) -> Path | None:
    """RMOD's weights and the kept block's values per block for a few prompts (RMOD paper Fig. 5)."""
    label = next((lbl for lbl, rows in tables.items() if rows and '"weights"' in rows[0].get("trace", "")
                  and '"gap"' in rows[0].get("trace", "")), None)
    if label is None:
        return None
    plt = _plt()
    rows = sorted(tables[label], key=lambda r: -len(json.loads(r["trace"])))[:prompts]
    fig, axes = plt.subplots(2, len(rows), figsize=(4.2 * len(rows), 5.5), squeeze=False)
    for c, row in enumerate(rows):
        trace = json.loads(row["trace"])
        blocks = range(len(trace))
        w = torch.tensor([t["weights"] for t in trace])
        bottom = torch.zeros(len(trace))
        for g, name in enumerate(names):
            axes[0, c].bar(blocks, w[:, g], bottom=bottom, color=COLORS[g % len(COLORS)], label=name)
            bottom += w[:, g]
            kept = [t["values"][t["chosen"]][g] for t in trace]
            axes[1, c].plot(blocks, kept, marker="o", color=COLORS[g % len(COLORS)], label=name)
        axes[0, c].set_title(row["prompt"][:48] + ("…" if len(row["prompt"]) > 48 else ""), fontsize=8)
        axes[0, c].set_ylabel("worst-case weights w*")
        axes[1, c].set_ylabel("kept block's value V_g")
        axes[1, c].set_xlabel("block")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{label}: weights and values per block", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_distributions(tables: dict[str, list[dict]], names: list[str], normalizer, path: Path) -> Path:
    plt = _plt()
    labels = list(tables)
    series = names + ["worst case"]
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 4), squeeze=False)
    for j, s in enumerate(series):
        data = []
        for label in labels:
            raw = torch.tensor([[r[f"reward_{g}"] for g in names] for r in tables[label]], dtype=torch.float64)
            norm = normalizer(raw)
            data.append((norm.min(1).values if s == "worst case" else norm[:, names.index(s)]).tolist())
        axes[0, j].boxplot(data, showmeans=True)
        axes[0, j].set_xticks(range(1, len(labels) + 1), labels, rotation=35, ha="right", fontsize=7)
        axes[0, j].set_title(f"{s} (normalised)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def claim_lines(comparison: dict) -> list[str]:
    """One sentence per claim: each method against each comparator, each pair of method families' hypervolumes, then
    each palette-guided method's realised levels against its targets."""
    lines = [c["sentence"] for c in comparison.get("claims", [])]
    fronts = comparison.get("fronts")
    if fronts:
        pct = round(100 * fronts["level"])
        for f, e in fronts["families"].items():
            lines.append(f"hypervolume of {f} ({', '.join(e['methods'])}): {e['hypervolume']:.4f} "
                         f"[{e['ci'][0]:.4f}, {e['ci'][1]:.4f}] ({pct}% bootstrap over {fronts['prompts']} prompts)")
        for d in fronts["differences"]:
            lines.append(f"hypervolume {d['a']} {'>' if d['diff'] > 0 else '<'} {d['b']}: {d['diff']:+.4f} "
                         f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}], "
                         f"{'significant' if d['significant'] else 'not significant'}")
    lines += [o["sentence"] for p in comparison.get("palette_levels", []) for o in p["objectives"].values()]
    return lines


def write_html(comparison: dict, rows: list[dict], plots: list[Path], path: Path, title: str,
               samples: dict[str, list[dict]] | None = None, note: str = "") -> Path:
    """A single file: the table, one sentence per claim (`claims`), the plots inlined as base64 PNGs, a few sample
    responses per method; `note` (e.g. that a run is smoke-sized) is printed first."""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    imgs = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" '
                   f'alt="{html.escape(p.stem)}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
                   for p in plots)
    extras = (f"<p>Pareto front: {html.escape(', '.join(comparison['pareto_front']))}. "
              + (f"Hypervolume vs {html.escape(comparison['reference'])}: {comparison['hypervolume']:.4f}. "
                 if "hypervolume" in comparison else "")
              + f"Navigation efficiency (share of methods improving every objective over the reference): "
              f"{comparison['navigation_efficiency']:.2f}.</p>")
    claims = comparison.get("claims", [])
    claims_html = ""
    if claims:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in claim_lines(comparison))
        claims_html = (f"<h2>What is significant</h2><p>Each method against each comparator in mean per-prompt worst "
                       f"case, paired by prompt, with a {round(100 * claims[0]['level'])}% bootstrap interval; "
                       f"significant means the interval excludes 0 (each of the {len(claims)} comparisons on its own, "
                       f"not adjusted for their number).</p><ul>{items}</ul>")
    warnings_html = "".join(f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in comparison.get("warnings", []))
    sample_html = ""
    for label, srows in (samples or {}).items():
        items = "".join(f"<li><b>{html.escape(r['prompt'])}</b><br>{html.escape(r['response'])}</li>" for r in srows)
        sample_html += f"<h3>{html.escape(label)}</h3><ol>{items}</ol>"
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f3f3f3}}td:first-child{{text-align:left}}
img{{max-width:100%;border:1px solid #eee}}figure{{margin:1.5em 0}}li{{margin:.5em 0;font-size:13px}}</style></head>
<body><h1>{html.escape(title)}</h1>{f'<p><b>{html.escape(note)}</b></p>' if note else ''}
<p>Held-out prompts; rewards normalised with π_ref's rollout statistics; worst case = min over objectives; win rates
are paired by prompt with ties counted half, 95% bootstrap intervals over prompts.</p>
{warnings_html}<table><tr>{head}</tr>{body}</table>{extras}{claims_html}{imgs}
<h2>Sample responses</h2>{sample_html}</body></html>"""
    atomic_write_text(path, doc)
    return path


def log_wandb(cfg, comparison: dict, tables: dict[str, list[dict]], plots: list[Path]) -> list[str]:
    """One W&B run per method (offline unless configured otherwise), grouped by the run directory."""
    import os

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    names, dirs = comparison["objectives"], []
    for label, m in comparison["methods"].items():
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mocd_train"), group=Path(cfg.run_dir).name,
                         job_type="evaluate", name=f"{Path(cfg.run_dir).name}-eval-{label}", dir=str(cfg.run_dir),
                         config={"method": label, "reference": comparison["reference"],
                                 "eval_group": Path(cfg.run_dir).name}, reinit="finish_previous")
        flat = {f"mean/{g}": m["mean"][g] for g in names} | {f"raw_mean/{g}": m["raw_mean"][g] for g in names}
        flat |= {"min_of_means": m["min_of_means"], "mean_worst_case": m["mean_worst_case"],
                 "worst_case_win_rate": m["vs_reference"]["worst_case_win_rate"],
                 **{f"cost/{k}": v for k, v in m["cost"].items()}}
        run.summary.update(flat)
        cols = ["prompt", "response"] + [f"reward_{g}" for g in names]
        run.log({"samples": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in tables[label][:50]]),
                 **{p.stem: wandb.Image(str(p)) for p in plots}})
        dirs.append(run.dir)
        run.finish()
    return dirs
