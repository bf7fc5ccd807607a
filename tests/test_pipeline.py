"""The one-command pipeline on tiny models: every stage runs in order, a second run skips every complete step."""

import json

import test_policies  # noqa: F401  (registers the test reward "brevity": it varies even for a random tiny model)
import yaml
from conftest import stage


def test_pipeline_runs_end_to_end_then_skips_complete_steps(tiny_lm, tmp_path, capsys):
    run_dir = tmp_path / "run"
    policy = {"method": "dpo", "objective": "brevity", "max_steps": 2, "learning_rate": 1e-3,
              "per_device_train_batch_size": 4, "logging_steps": 1}
    config = {
        "run_dir": str(run_dir), "seed": 0, "model": tiny_lm, "objectives": ["brevity", "readability"],
        "report_to": "none",
        "rollouts": {"max_prompts": 12, "num_samples": 4, "max_new_tokens": 8, "chunk_size": 6},
        "value": {"num_train_epochs": 1, "heldout_fraction": 0.25},
        "teach": {"num_candidates": 2, "block_size": 4, "max_new_tokens": 8, "batch_size": 4, "chunk_size": 4,
                  "max_prompts": 6},
        "distill": {"teachers": {"rmod-train": 1.0}, "max_steps": 2, "heldout_fraction": 0.0},
        "evaluate": {"methods": ["eval-rmod", "eval-mod", "eval-student"]},
        "pipeline": [
            {"stage": "rollouts"}, {"stage": "value"},
            {"stage": "policies", "name": "a", **policy},
            {"stage": "policies", "name": "b", **policy, "objective": None,
             "weights": {"brevity": 0.5, "readability": 0.5}},
            {"stage": "teach", "name": "eval-pi_ref", "decoder": "pi_ref", "split": "heldout"},
            {"stage": "teach", "name": "eval-rmod", "split": "heldout"},
            {"stage": "teach", "name": "eval-mod", "decoder": "mod", "policies": ["a", "b"], "mod_weights": [0.5, 0.5],
             "split": "heldout"},
            {"stage": "teach", "name": "rmod-train", "split": "train"},
            {"stage": "distill", "name": "student"},
            {"stage": "teach", "name": "eval-student", "decoder": "pi_ref",
             "model": "{run_dir}/distill/student/student", "split": "heldout"},
            {"stage": "evaluate"},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    first = stage("pipeline").main(["--config", str(path)])
    assert [s["stage"] for s in first["steps"]][-1] == "evaluate" and len(first["steps"]) == 11
    page = (run_dir / "eval" / "report.html").read_text()
    assert all(m in page for m in ["eval-pi_ref", "eval-rmod", "eval-mod", "eval-student"])
    table = json.loads((run_dir / "eval" / "comparison.json").read_text())
    assert set(table["methods"]) == {"eval-pi_ref", "eval-rmod", "eval-mod", "eval-student"}
    outputs = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
               if p.is_file() and "eval" not in p.relative_to(run_dir).parts and p.name != "pipeline.json"}
    capsys.readouterr()
    stage("pipeline").main(["--config", str(path)])  # everything complete: skipped (evaluate re-runs)
    assert capsys.readouterr().out.count("already complete") == 10
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs  # no complete output was rewritten


def test_best_placeholder_picks_the_parameter_of_the_best_method_on_an_earlier_evaluation(tmp_path):
    import json

    import pytest

    from mocd_train.errors import ConfigError

    pipeline = stage("pipeline")
    methods = {"val-pi_ref": {"mean_worst_case": 0.9, "params": {}},
               "val-rmod-1": {"mean_worst_case": -0.2, "params": {"rmod_lambda": 1.0}},
               "val-rmod-5": {"mean_worst_case": 0.1, "params": {"rmod_lambda": 5.0}},
               "val-cd": {"mean_worst_case": 0.5, "params": {"weights": [0.5, 0.5]}}}
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "comparison.json").write_text(json.dumps({"reference": "val-pi_ref", "methods": methods}))
    assert pipeline.substitute("{best:val:rmod_lambda}", tmp_path) == 5.0  # the reference and other decoders aside
    assert pipeline.substitute("{run_dir}/x", tmp_path) == f"{tmp_path}/x" and pipeline.substitute(3, tmp_path) == 3
    with pytest.raises(ConfigError, match="no .*comparison.json"):
        pipeline.substitute("{best:test:rmod_lambda}", tmp_path)
    with pytest.raises(ConfigError, match="no method"):
        pipeline.substitute("{best:val:top_k}", tmp_path)
