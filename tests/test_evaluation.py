import pytest
import torch

from mocd_train.evaluation import align, method_metrics, paired_comparison


def test_metrics_by_hand():
    a = torch.tensor([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [0.5, 0.5], [-1.0, 3.0]], dtype=torch.float64)
    m = method_metrics(a, ["x", "y"])
    assert m["mean"] == {"x": pytest.approx(7 / 6), "y": pytest.approx(-1 / 6)}
    assert m["min_of_means"] == pytest.approx(-1 / 6) and m["min_of_means_objective"] == "y"
    assert m["mean_worst_case"] == pytest.approx((-1 + 0.5 + 0) / 3)
    c = paired_comparison(a, b)
    # per-prompt worst cases: a = (-1, 0.5, 0), b = (0, 0.5, -1): a loses, ties (half), wins
    assert c["worst_case_win_rate"] == pytest.approx(0.5)
    assert c["worst_case_diff"] == pytest.approx(0.0)


def test_align_pairs_rows_by_prompt():
    a = [{"prompt_id": "p1", "v": 1}, {"prompt_id": "p2", "v": 2}, {"prompt_id": "p3", "v": 3}]
    b = [{"prompt_id": "p3", "v": 30}, {"prompt_id": "p1", "v": 10}]
    x, y = align(a, b)
    assert [r["v"] for r in x] == [1, 3] and [r["v"] for r in y] == [10, 30]


def test_pareto_front_hypervolume_and_navigation_efficiency():
    from mocd_train.evaluation import hypervolume, navigation_efficiency, pareto_front

    pts = torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [1.5, 1.5], [0.5, 0.5]])
    assert pareto_front(pts) == [0, 1, 2]
    ref = torch.tensor([0.0, 0.0])
    # union of [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1] = 3 + 2·1 + 1·1 = 6
    assert hypervolume(pts, ref) == pytest.approx(6.0)
    cube = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.5, 0.5]])
    # [0,1]^3 ∪ [0,2]x[0,.5]^2 = 1 + 1·0.25 = 1.25
    assert hypervolume(cube, torch.zeros(3)) == pytest.approx(1.25)
    rng = torch.Generator().manual_seed(0)  # Monte Carlo check of the 3-D slicing
    pts3 = torch.rand(6, 3, generator=rng)
    samples = torch.rand(200000, 3, generator=rng)
    covered = (samples[:, None, :] <= pts3[None]).all(-1).any(-1).double().mean()
    assert hypervolume(pts3, torch.zeros(3)) == pytest.approx(float(covered), abs=0.01)
    assert navigation_efficiency(pts, torch.tensor([0.8, 0.8])) == pytest.approx(4 / 5)


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_more_prompts():
    from mocd_train.evaluation import bootstrap_ci

    g = torch.Generator().manual_seed(1)
    small, large = torch.rand(50, generator=g), torch.rand(2000, generator=g)
    lo, hi = bootstrap_ci(small)
    assert lo < float(small.mean()) < hi
    lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 3


def test_palette_levels_set_paired_held_out_gains_against_the_target_gains():
    import numpy as np

    from mocd_train.evaluation import palette_levels

    rng = np.random.default_rng(0)
    n = 300
    ref = rng.normal(0.4, 0.2, n)
    # gains of +0.10 and +0.02 (± 0.003 SE); the reference rows in another order, with one prompt more
    x, y = ref + 0.10 + rng.normal(0, 0.05, n), ref + 0.02 + rng.normal(0, 0.05, n)
    method = [{"prompt_id": f"p{i}", "reward_x": x[i], "reward_y": y[i]} for i in range(n)]
    refs = [{"prompt_id": f"p{i}", "reward_x": ref[i], "reward_y": ref[i]} for i in reversed(range(n))]
    refs.append({"prompt_id": "extra", "reward_x": 9.0, "reward_y": 9.0})
    palette = {"name": "pal", "objectives": ["x", "y"], "target": [0.55, 0.31], "reference": [0.50, 0.30]}
    out = palette_levels("m", method, refs, ["x", "y"], palette)
    assert out["prompts"] == n
    ox, oy = out["objectives"]["x"], out["objectives"]["y"]
    assert ox["target_gain"] == pytest.approx(0.05) and oy["target_gain"] == pytest.approx(0.01)
    assert ox["gain"] == pytest.approx(float(np.mean(x - ref))) and ox["level_raw"] == pytest.approx(x.mean())
    assert ox["gain_se"] == pytest.approx(float(np.std(x - ref, ddof=1) / np.sqrt(n)))
    assert ox["ci"][0] < ox["gain"] < ox["ci"][1] and ox["verdict"] == "reached"  # +0.10 vs +0.05
    assert oy["ci"][0] < oy["gain"] < oy["ci"][1] and oy["verdict"] == "reached"  # +0.02 vs +0.01
    short = palette_levels("m", method, refs, ["x", "y"], {**palette, "target": [0.70, 0.32]})
    assert [o["verdict"] for o in short["objectives"].values()] == ["short", "within the interval"]
    assert "short" in short["objectives"]["x"]["sentence"] and "+0.2000" in short["objectives"]["x"]["sentence"]
    with pytest.raises(Exception, match="'z'"):
        palette_levels("m", method, refs, ["x", "y"], {**palette, "objectives": ["x", "z"]})


def test_evaluate_recipe_writes_the_report_plots_and_offline_wandb_runs(tiny_lm, tmp_path):
    import html
    import json

    from conftest import stage
    from datasets import Dataset

    from mocd_train.rewards import Normalizer
    from mocd_train.tiny import synthetic_rollouts

    names = ["readability", "positivity"]
    synthetic_rollouts(tmp_path, tiny_lm, tuple(names), num_prompts=4)
    norm = Normalizer.load(tmp_path / "rollouts" / "normalization.json")
    g = torch.Generator().manual_seed(0)
    rewards = {}
    for method, shift in [("eval-pi_ref", 0.0), ("eval-rmod", 0.05), ("eval-other", -0.05)]:
        raw = torch.rand(30, 2, generator=g, dtype=torch.float64) * 0.3 + shift
        rewards[method] = raw
        trace = [{"block": b, "values": [[0.1, 0.2], [0.3, -0.1]], "chosen": 1, "weights": [0.4, 0.6], "gap": 0.0}
                 for b in range(3)] if method == "eval-rmod" else []
        Dataset.from_list([{"prompt_id": f"p{i}", "prompt": f"question {i}", "response": f"answer {i}",
                            "num_response_tokens": 10, "trace": json.dumps(trace), "cost_policy_tokens": 40.0,
                            "cost_value_tokens": 40.0, "cost_seconds": 0.5,
                            **{f"reward_{n}": float(raw[i, j]) for j, n in enumerate(names)}}
                           for i in range(30)]).save_to_disk(str(tmp_path / "teach" / method / "dataset"))
    (tmp_path / "palette" / "pal").mkdir(parents=True)
    (tmp_path / "palette" / "pal" / "palette.json").write_text(json.dumps(
        {"name": "pal", "objectives": names, "target": [0.3, 0.3], "reference": [0.2, 0.2]}))
    out = stage("evaluate").main(["--run_dir", str(tmp_path), "--objectives", "[readability, positivity]",
                                   "--methods", "[eval-rmod, eval-other]", "--report_to", "wandb",
                                   "--baselines", "[eval-other]", "--note", "smoke-sized run",
                                   "--fronts", "{a: [eval-rmod], b: [eval-other, eval-rmod]}",
                                   "--palette_targets", "{eval-rmod: pal}",
                                   "--export_dir", str(tmp_path / "results" / "preset")])
    page = (out / "report.html").read_text()
    assert all(m in page for m in ["eval-pi_ref", "eval-rmod", "eval-other"]) and page.count("data:image/png") == 4
    for png in ["methods", "pareto", "distributions", "rmod_trace"]:
        assert (out / f"{png}.png").stat().st_size > 10_000
    comparison = json.loads((out / "comparison.json").read_text())
    a, b = norm(rewards["eval-rmod"]).min(1).values, norm(rewards["eval-pi_ref"]).min(1).values
    expected = float(((a > b).double() + 0.5 * (a == b).double()).mean())
    assert comparison["methods"]["eval-rmod"]["vs_reference"]["worst_case_win_rate"] == pytest.approx(expected)
    runs = json.loads((out / "DONE.json").read_text())["wandb"]
    assert len(runs) == 3 and all("offline-run" in r for r in runs)
    definition = json.loads((out / "wandb_report.json").read_text())  # offline: saved to publish later
    assert definition["methods"] == ["eval-pi_ref", "eval-rmod", "eval-other"]
    # one claim per method and comparator, stated in the report with its interval
    claims = {(c["method"], c["versus"]): c for c in comparison["claims"]}
    assert set(claims) == {("eval-rmod", "eval-pi_ref"), ("eval-other", "eval-pi_ref"), ("eval-rmod", "eval-other"),
                           ("eval-pi_ref", "eval-other")}
    c = claims[("eval-rmod", "eval-pi_ref")]
    assert c["diff"] == pytest.approx(float((a - b).mean()))
    assert c["significant"] == (c["ci"][0] > 0 or c["ci"][1] < 0) and c["ci"][0] <= c["diff"] <= c["ci"][1]
    verdict = "significant" if c["significant"] else "not significant"
    text = html.unescape(page)
    assert f"eval-rmod {'>' if c['diff'] > 0 else '<'} eval-pi_ref: {c['diff']:+.3f}" in text and verdict in text
    assert "smoke-sized run" in page and c["sentence"] in (out / "claims.md").read_text()
    from mocd_train.evaluation import hypervolume

    fronts, ref_point = comparison["fronts"], norm(rewards["eval-pi_ref"]).mean(0)
    hv_b = hypervolume(torch.stack([norm(rewards[m]).mean(0) for m in ["eval-other", "eval-rmod"]]), ref_point)
    assert fronts["families"]["b"]["hypervolume"] == pytest.approx(hv_b)
    lo, hi = fronts["families"]["b"]["ci"]
    assert lo <= hv_b <= hi and fronts["differences"][0]["diff"] == pytest.approx(
        fronts["families"]["a"]["hypervolume"] - hv_b)
    assert "hypervolume a" in text
    # the palette-guided method's realised gain over π_ref against the palette's target gain (+0.1 each)
    (levels,) = comparison["palette_levels"]
    gain = rewards["eval-rmod"][:, 0] - rewards["eval-pi_ref"][:, 0]
    assert levels["objectives"]["readability"]["gain"] == pytest.approx(float(gain.mean()))
    assert levels["objectives"]["readability"]["target_gain"] == pytest.approx(0.1)
    assert levels["objectives"]["readability"]["sentence"] in text
    exported = {f.name for f in (tmp_path / "results" / "preset").iterdir()}
    assert {"report.html", "table.md", "claims.md", "comparison.json", "pareto.png"} <= exported
    # a mistake in the methods list is refused before the finished report is touched
    with pytest.raises(Exception, match="eval-rmdo"):
        stage("evaluate").main(["--run_dir", str(tmp_path), "--objectives", "[readability, positivity]",
                                 "--methods", "[eval-rmdo]", "--report_to", "none"])
    with pytest.raises(Exception, match="no palette 'nopal'"):
        stage("evaluate").main(["--run_dir", str(tmp_path), "--objectives", "[readability, positivity]",
                                 "--methods", "[eval-rmod]", "--palette_targets", "{eval-rmod: nopal}",
                                 "--report_to", "none"])
    assert (out / "report.html").read_text() == page


def test_hypervolume_is_exact_in_float64():
    """Against exact rational inclusion–exclusion over the union of boxes, on points 1e-9 apart (float32 rounds
    them together)."""
    from fractions import Fraction
    from itertools import combinations

    from mocd_train.evaluation import hypervolume

    rng = torch.Generator().manual_seed(1)
    pts = 1.0 + torch.rand(7, 3, generator=rng, dtype=torch.float64) * 1e-6
    ref = torch.ones(3, dtype=torch.float64)
    exact = Fraction(0)
    rows = [[Fraction(x) for x in p] for p in pts.tolist()]
    for size in range(1, len(rows) + 1):
        for subset in combinations(rows, size):
            box = Fraction(1)
            for axis in range(3):
                box *= min(p[axis] for p in subset) - 1
            exact += box if size % 2 else -box
    assert abs(hypervolume(pts, ref) - float(exact)) <= 1e-12 * float(exact)


def test_the_wandb_report_definition_names_every_method_and_panel_and_builds_offline():
    pytest.importorskip("wandb_workspaces")
    from mocd_train.wandb_report import build_report, report_definition

    methods = {m: {"mean": {"a": 0.1 * i, "b": -0.1 * i}, "mean_worst_case": -0.1 * i, "min_of_means": -0.1 * i,
                   "vs_reference": {"worst_case_win_rate": 0.5}} for i, m in enumerate(["eval-pi_ref", "eval-rmod"])}
    comparison = {"objectives": ["a", "b"], "reference": "eval-pi_ref", "methods": methods,
                  "claims": [{"sentence": "eval-rmod < eval-pi_ref: -0.100 [-0.2, 0.0], not significant"}]}
    d = report_definition(comparison, "my-run", project="p")
    assert d["methods"] == ["eval-pi_ref", "eval-rmod"] and all(m in d["table"] for m in d["methods"])
    titles = [p["title"] for p in d["panels"]]
    assert {"mean normalised a", "mean normalised b", "mean per-prompt worst case", "Pareto: a vs b"} <= set(titles)
    assert d["claims"] == ["eval-rmod < eval-pi_ref: -0.100 [-0.2, 0.0], not significant"]
    report = build_report(d)  # no network: only the object
    grid = report.blocks[-1]
    assert report.title == "my-run: comparison" and len(grid.panels) == len(d["panels"])
    assert "my-run" in grid.runsets[0].filters


def test_methods_on_other_prompts_are_refused_or_flagged():
    from mocd_train.errors import ConfigError
    from mocd_train.evaluation import compare
    from mocd_train.rewards import Normalizer

    norm = Normalizer(["a"], [0.0], [1.0])

    def rows(ids):
        return [{"prompt_id": i, "reward_a": float(n), "num_response_tokens": 3} for n, i in enumerate(ids)]

    with pytest.raises(ConfigError, match="shares no prompt with the reference"):
        compare({"ref": rows(["p1", "p2"]), "m": rows(["q1"])}, "ref", ["a"], norm)
    out = compare({"ref": rows(["p1", "p2", "p3"]), "m": rows(["p1", "p3"])}, "ref", ["a"], norm)
    assert out["warnings"] == ["m covers 2 of the reference's 3 prompts: its numbers are over those prompts only "
                               "(paired comparisons stay paired)."]
