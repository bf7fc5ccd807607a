"""The one-command pipeline on tiny models: every stage runs in order, a second run skips every complete step."""

import json

import test_policies  # noqa: F401  (registers the test reward "brevity": it varies even for a random tiny model)
import yaml
from test_rollouts import recipe


def test_pipeline_runs_end_to_end_then_skips_complete_steps(tiny_lm, tmp_path):
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
            {"stage": "teach", "name": "eval-mod", "decoder": "mod", "policies": ["a", "b"], "weights": [0.5, 0.5],
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
    first = recipe("pipeline").main(["--config", str(path)])
    assert [s["stage"] for s in first["steps"]][-1] == "evaluate" and len(first["steps"]) == 11
    page = (run_dir / "eval" / "report.html").read_text()
    assert all(m in page for m in ["eval-pi_ref", "eval-rmod", "eval-mod", "eval-student"])
    table = json.loads((run_dir / "eval" / "comparison.json").read_text())
    assert set(table["methods"]) == {"eval-pi_ref", "eval-rmod", "eval-mod", "eval-student"}
    second = recipe("pipeline").main(["--config", str(path)])  # everything complete: skipped (evaluate re-runs)
    assert sum(s["seconds"] for s in second["steps"][:-1]) < sum(s["seconds"] for s in first["steps"][:-1]) / 3
