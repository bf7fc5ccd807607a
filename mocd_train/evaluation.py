"""Metrics for comparing methods on the same held-out prompts (docs/algorithms.md §8). Pure torch on reward tables.

Rewards are normalised with π_ref's rollout statistics before anything is compared across objectives. Standard
errors are over prompts; comparisons between two methods are paired by prompt.
"""

from __future__ import annotations

import json
import math

import torch

from mocd_train.errors import ConfigError


def _se(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def method_metrics(norm: torch.Tensor, names: list[str]) -> dict:
    """norm [N, G] normalised rewards of one method → per-objective means, min over objectives of the means (the RMOD
    paper's worst-case reward, with the objective that attains it) and the mean per-prompt worst case."""
    means = norm.mean(0)
    worst = norm.min(1).values
    return {
        "mean": {g: float(m) for g, m in zip(names, means)},
        "mean_se": {g: _se(norm[:, i]) for i, g in enumerate(names)},
        "min_of_means": float(means.min()), "min_of_means_objective": names[int(means.argmin())],
        "mean_worst_case": float(worst.mean()), "mean_worst_case_se": _se(worst),
        "prompts": len(norm),
    }


def paired_comparison(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Method a vs method b on the same prompts (rows aligned): worst-case win rate of a (ties count half) and the
    mean difference of per-prompt worst cases, each with its standard error."""
    wa, wb = a.min(1).values, b.min(1).values
    wins = (wa > wb).double() + 0.5 * (wa == wb).double()
    diff = wa - wb
    return {"worst_case_win_rate": float(wins.mean()), "worst_case_win_rate_se": _se(wins),
            "worst_case_diff": float(diff.mean()), "worst_case_diff_se": _se(diff)}


def align(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows of two methods for the prompts both decoded, in the same order."""
    by_b = {r["prompt_id"]: r for r in rows_b}
    common = [r for r in rows_a if r["prompt_id"] in by_b]
    return common, [by_b[r["prompt_id"]] for r in common]


def bootstrap_ci(x: torch.Tensor, level: float = 0.95, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-prompt values x [N] (resampling prompts)."""
    if len(x) < 2:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (n, len(x)), generator=g)
    means = x.double()[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def pareto_front(points: torch.Tensor) -> list[int]:
    """Indices of the points [n, G] no other point dominates (≥ everywhere, > somewhere); higher is better."""
    front = []
    for i in range(len(points)):
        ge = (points >= points[i]).all(1)
        gt = (points > points[i]).any(1)
        if not (ge & gt).any():
            front.append(i)
    return front


def hypervolume(points: torch.Tensor, reference: torch.Tensor) -> float:
    """Volume dominated by the points [n, G] and bounded below by `reference` [G] (G = 2 or 3; exact, by slicing,
    in float64 throughout)."""
    ref = reference.double().tolist()
    pts = [p for p in points.double().tolist() if all(v > r for v, r in zip(p, ref))]
    if len(ref) == 2:
        return _area(pts, ref)
    if len(ref) == 3:  # slice along the third axis: area of the 2-D front above each level
        zs = sorted({p[2] for p in pts}, reverse=True)
        volume = 0.0
        for i, z in enumerate(zs):
            below = zs[i + 1] if i + 1 < len(zs) else ref[2]
            volume += _area([p[:2] for p in pts if p[2] >= z], ref[:2]) * (z - below)
        return volume
    raise ValueError(f"hypervolume is implemented for 2 or 3 objectives, got {len(ref)}.")


def _area(pts: list[list[float]], ref: list[float]) -> float:
    """The 2-D hypervolume of points that all dominate ref."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(pts, key=lambda p: -p[0]):
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


def navigation_efficiency(points: torch.Tensor, reference: torch.Tensor) -> float:
    """MAP's navigation efficiency: the share of results that improve every objective over the reference."""
    return float((points > reference).all(1).double().mean()) if len(points) else float("nan")


def compare(tables: dict[str, list[dict]], reference: str, names: list[str], normalizer,
            baselines: list[str] = (), fronts: dict[str, list[str]] | None = None,
            palettes: dict[str, dict] | None = None) -> dict:
    """Every method's rows (teacher-dataset rows with reward_<g> and cost_* columns) on the prompts it shares with
    the reference → one comparison: raw and normalised means, worst cases, worst-case win rate vs the reference with
    a bootstrap CI, cost; plus the Pareto front, hypervolume and navigation efficiency of the methods' mean points,
    and for each method in `palettes` (method → its palette.json) its realised levels against the targets."""

    def norm(rows):
        return normalizer(torch.tensor([[r[f"reward_{g}"] for g in names] for r in rows], dtype=torch.float64))

    ref_rows = tables[reference]
    out = {"objectives": names, "reference": reference, "methods": {}, "warnings": []}
    for label, rows in tables.items():
        a, b = align(rows, ref_rows)
        if not a:
            raise ConfigError(f"method {label!r} shares no prompt with the reference {reference!r}: decode both on "
                              "the same split and prompts (--split heldout, the same max_prompts / first_prompt).")
        if len(a) < len(ref_rows):
            out["warnings"].append(f"{label} covers {len(a)} of the reference's {len(ref_rows)} prompts: its numbers "
                                   "are over those prompts only (paired comparisons stay paired).")
        na, nb = norm(a), norm(b)
        entry = method_metrics(na, names)
        entry["params"] = json.loads(rows[0]["params"]) if isinstance(rows[0].get("params"), str) else {}
        entry["raw_mean"] = {g: float(sum(r[f"reward_{g}"] for r in a) / len(a)) for g in names}
        wins = (na.min(1).values > nb.min(1).values).double() + 0.5 * (na.min(1).values == nb.min(1).values).double()
        entry["vs_reference"] = {**paired_comparison(na, nb), "worst_case_win_rate_ci": bootstrap_ci(wins)}
        tokens = sum(r["num_response_tokens"] for r in a)
        seconds = sum(r.get("cost_seconds", 0.0) for r in a)
        entry["cost"] = {"policy_tokens_per_prompt": sum(r.get("cost_policy_tokens", 0.0) for r in a) / len(a),
                         "value_tokens_per_prompt": sum(r.get("cost_value_tokens", 0.0) for r in a) / len(a),
                         "seconds_per_prompt": seconds / len(a),
                         "response_tokens_per_second": tokens / seconds if seconds else float("nan")}
        out["methods"][label] = entry
    labels = list(out["methods"])
    points = torch.tensor([[out["methods"][m]["mean"][g] for g in names] for m in labels], dtype=torch.float64)
    ref_point = points[labels.index(reference)]
    out["pareto_front"] = [labels[i] for i in pareto_front(points)]
    if len(names) in (2, 3):
        out["hypervolume"] = hypervolume(points, ref_point)
    out["navigation_efficiency"] = navigation_efficiency(
        torch.cat([points[:labels.index(reference)], points[labels.index(reference) + 1:]]), ref_point)
    out["claims"] = [claim(label, tables[label], versus, tables[versus], names, normalizer)
                     for versus in [reference, *[b for b in baselines if b in tables and b != reference]]
                     for label in tables if label != versus]
    if fronts and len(names) in (2, 3):
        out["fronts"] = front_hypervolumes(tables, reference, fronts, names, normalizer)
    if palettes:
        out["palette_levels"] = [palette_levels(m, tables[m], ref_rows, names, p) for m, p in palettes.items()]
    return out


def front_hypervolumes(tables: dict[str, list[dict]], reference: str, fronts: dict[str, list[str]],
                       names: list[str], normalizer, n: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Hypervolume above π_ref's mean point of each named family of methods' mean points (e.g. MOD and the soup at
    several weights), with a percentile bootstrap interval over prompts — every method and the reference resampled
    on the same prompts — and the same for the difference of each pair of families."""
    ids = set.intersection(*({r["prompt_id"] for r in tables[m]} for m in [reference, *sum(fronts.values(), [])]))
    if not ids:
        raise ValueError("the methods of `fronts` share no prompt with the reference.")
    order = sorted(ids)

    def matrix(label):
        by = {r["prompt_id"]: r for r in tables[label]}
        return normalizer(torch.tensor([[by[i][f"reward_{g}"] for g in names] for i in order], dtype=torch.float64))

    mats = {m: matrix(m) for m in {reference, *sum(fronts.values(), [])}}

    def volumes(idx):
        ref = mats[reference][idx].mean(0)
        return {f: hypervolume(torch.stack([mats[m][idx].mean(0) for m in ms]), ref) for f, ms in fronts.items()}

    point = volumes(torch.arange(len(order)))
    gen = torch.Generator().manual_seed(seed)
    draws = [volumes(torch.randint(len(order), (len(order),), generator=gen)) for _ in range(n)]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)

    def interval(xs):
        lo, hi = torch.quantile(torch.tensor(xs, dtype=torch.float64), q)
        return [float(lo), float(hi)]

    out = {"prompts": len(order), "level": level,
           "families": {f: {"methods": fronts[f], "hypervolume": point[f], "ci": interval([d[f] for d in draws])}
                        for f in fronts}, "differences": []}
    families = list(fronts)
    for i, a in enumerate(families):
        for b in families[i + 1:]:
            lo, hi = interval([d[a] - d[b] for d in draws])
            out["differences"].append({"a": a, "b": b, "diff": point[a] - point[b], "ci": [lo, hi],
                                       "significant": bool(lo > 0 or hi < 0)})
    return out


def palette_levels(label: str, rows: list[dict], ref_rows: list[dict], names: list[str], palette: dict,
                   level: float = 0.95) -> dict:
    """A palette-guided method's realised levels against its palette's targets (MAP §2: the aligned policy is to
    reach E[r_g] ≥ c_g; docs/algorithms.md §8). The targets were set on the rollout prompts and the method is
    evaluated on held-out ones, so the comparison is in gains over π_ref in raw reward units: the palette's target
    gain c_g − E_π_ref[r_g] (rollouts) against the method's paired gain over the reference on the held-out prompts,
    with a bootstrap interval. "reached" when the interval lies above the target gain, "short" when below it."""
    a, b = align(rows, ref_rows)
    out = {"method": label, "palette": palette["name"], "prompts": len(a), "level": level, "objectives": {}}
    for i, g in enumerate(palette["objectives"]):
        if g not in names:
            raise ConfigError(f"palette {palette['name']!r} targets {g!r}, which this run does not score.")
        diff = torch.tensor([x[f"reward_{g}"] - y[f"reward_{g}"] for x, y in zip(a, b)], dtype=torch.float64)
        lo, hi = bootstrap_ci(diff, level)
        target = float(palette["target"][i] - palette["reference"][i])
        verdict = "reached" if lo > target else "short" if hi < target else "within the interval"
        out["objectives"][g] = {"target_gain": target, "gain": float(diff.mean()), "gain_se": _se(diff),
                                "ci": [lo, hi], "level_raw": float(sum(x[f"reward_{g}"] for x in a) / len(a)),
                                "verdict": verdict,
                                "sentence": f"{label} {g} (palette {palette['name']}): {float(diff.mean()):+.4f} "
                                            f"[{lo:+.4f}, {hi:+.4f}] over {len(a)} prompts vs target "
                                            f"{target:+.4f} (raw gain over π_ref): {verdict}"}
    return out


def claim(label: str, rows: list[dict], versus: str, versus_rows: list[dict], names: list[str], normalizer,
          level: float = 0.95) -> dict:
    """Method vs a comparator in mean per-prompt worst case, paired by prompt: the difference with its bootstrap
    interval, whether the interval excludes 0 (not adjusted for the number of comparisons), and the sentence the
    report prints, e.g. "eval-rmod > eval-cd_uniform: +0.031 [−0.012, +0.074], not significant"."""
    a, b = align(rows, versus_rows)

    def worst(rs):
        raw = torch.tensor([[r[f"reward_{g}"] for g in names] for r in rs], dtype=torch.float64)
        return normalizer(raw).min(1).values

    diff = worst(a) - worst(b)
    mean, (lo, hi) = float(diff.mean()), bootstrap_ci(diff, level)
    significant = bool(lo > 0 or hi < 0)
    sentence = (f"{label} {'>' if mean > 0 else '<' if mean < 0 else '='} {versus}: {mean:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}], {'significant' if significant else 'not significant'}")
    return {"method": label, "versus": versus, "metric": "mean per-prompt worst case", "diff": mean,
            "diff_se": _se(diff), "ci": [lo, hi], "level": level, "prompts": len(diff), "significant": significant,
            "sentence": sentence}
