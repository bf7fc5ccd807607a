"""Stage `palette`: a MAP value palette → the λ of one fixed reward λᵀr that reaches it on π_ref's rollouts, or the
LP proof that no λ can (and the nearest palette that can).

    python recipes/solve_palette.py --config recipes/smollm2-mini-hh/pipeline.yaml \\
        --name hh-65 --targets '{helpfulness: "65%", harmlessness: "65%"}' [--auto_adjust interpolate]

Writes <run_dir>/palette/<name>/palette.json (read by MAP-D and by train_policy.py --palette) and, when feasible,
DONE.json. Exits 1 when the palette is infeasible and auto_adjust is 'none', after printing the palette that
interpolation suggests.
"""

import sys

import numpy as np

from mocd_train.cli import run_stage
from mocd_train.data import load_rollouts
from mocd_train.palette import (
    PALETTE_FILE,
    greedy_palette,
    interpolate_palette,
    resolve_palette,
    sensitivity,
    solve_palette,
)
from mocd_train.rewards import parse_objectives
from mocd_train.rundir import atomic_write_json, stage_dir
from mocd_train.stage import Stage
from mocd_train.values import check_objectives


def main(argv=None):
    # parse
    cfg, stage = Stage.open("palette", argv, lambda c: f"palette/{c.name}", processes=False)
    names = [s.name for s in parse_objectives(cfg.objectives)]
    stage.require(rollouts=stage_dir(cfg.run_dir, "rollouts"))
    if stage.complete:
        print(f"palette {cfg.name} already solved: {stage.dir / PALETTE_FILE}")
        return stage.dir / PALETTE_FILE

    # load: π_ref's rewards on the rollouts (the pilot set), raw units
    rollouts, normalizer = load_rollouts(cfg.run_dir)
    check_objectives(names, normalizer.objectives, f"the rollouts in {cfg.run_dir}",
                     "Name the objectives they were scored with.")
    rewards = np.array([[row[f"reward_{g}"] for g in names] for row in rollouts], dtype=np.float64)
    groups = np.array(rollouts["prompt_id"]) if cfg.grouping == "prompt" else None

    # solve (and adjust when asked)
    stage.start()
    target = resolve_palette(cfg.targets, names, rewards, groups)
    sol = solve_palette(rewards, target, groups, method=cfg.method, tol=cfg.tol)
    adjusted = None
    if not sol.feasible:
        if cfg.auto_adjust == "greedy":
            order = [names.index(g) for g in (cfg.priority or names)]
            new = greedy_palette(rewards, target, order, groups)
            adjusted = {"method": "greedy", "priority": cfg.priority or names, "requested": target.tolist()}
        else:
            new, rho = interpolate_palette(rewards, target, groups)
            adjusted = {"method": "interpolate", "rho": rho, "requested": target.tolist()}
        if cfg.auto_adjust != "none":
            sol = solve_palette(rewards, new, groups, method=cfg.method, tol=cfg.tol)

    # save + report
    record = {"name": cfg.name, "objectives": names, "spec": cfg.targets, **sol.to_dict(),
              "num_pilot_samples": len(rewards), "grouping": cfg.grouping,
              "rollouts": str(stage_dir(cfg.run_dir, "rollouts")),
              "normalization": normalizer.__dict__, "adjusted": adjusted if cfg.auto_adjust != "none" else None,
              "suggested": None if sol.feasible else {**adjusted, "palette": new.tolist()},
              "sensitivity": sensitivity(rewards, sol.lam, groups).tolist() if sol.feasible else None}
    path = stage.dir / PALETTE_FILE
    atomic_write_json(path, record)
    print(table(names, sol, record))
    print(f"  → {path}")
    if sol.feasible:
        stage.finish({"palette": str(path), "feasible": True, "lam": record["lam"]})
    else:  # not complete: an infeasible palette is not something later stages may use
        print(f"infeasible: LP margin {sol.margin:+.4f} ≤ 0. Suggested ({adjusted['method']}, ρ = "
              f"{adjusted.get('rho', float('nan')):.3f}): "
              + ", ".join(f"{g}: {v:.4g}" for g, v in zip(names, new))
              + ". Re-run with --auto_adjust interpolate (or greedy) to use it.", file=sys.stderr)
        raise SystemExit(1)
    return path


def table(names, sol, record) -> str:
    head = f"{'objective':<16}{'reference c0':>14}{'target':>12}{'realised':>12}{'λ':>12}"
    rows = [head, "-" * len(head)]
    for i, g in enumerate(names):
        rows.append(f"{g:<16}{sol.reference[i]:>14.4f}{sol.target[i]:>12.4f}{sol.realized[i]:>12.4f}{sol.lam[i]:>12.4f}")
    verdict = "feasible" if sol.feasible else "INFEASIBLE"
    extra = f", adjusted by {record['adjusted']['method']}" if record["adjusted"] else ""
    per_prompt = f" ({sol.ess_per_prompt:.2f} per prompt)" if record["grouping"] == "prompt" else ""
    rows.append(f"{verdict}{extra}: LP margin {sol.margin:+.4f}, ESS {sol.ess:.1f} of {record['num_pilot_samples']}"
                f"{per_prompt}, "
                f"KKT residual {sol.kkt_violation:.1e} ({'converged' if sol.converged else 'NOT converged'})")
    return "\n".join(rows)


if __name__ == "__main__":
    run_stage(main)
