import json

import pytest
import torch
from conftest import stage

from mocd_train.config import ConfigError
from mocd_train.decoding.map_d import MapD, resample
from mocd_train.palette import load_palette
from mocd_train.tiny import synthetic_rollouts

OBJECTIVES = ["readability", "positivity"]


def solve(run_dir, *extra):
    return stage("palette").main(["--run_dir", str(run_dir), "--objectives", f"[{', '.join(OBJECTIVES)}]",
                                         "--report_to", "none", *extra])


def test_solve_palette_recipe_feasible_infeasible_and_adjusted(tiny_lm, tmp_path, capsys):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=48)
    path = solve(tmp_path, "--name", "p60", "--targets", "{readability: '60%', positivity: keep}")
    rec = json.loads(path.read_text())
    assert rec["feasible"] and rec["converged"] and rec["margin"] > 0
    assert rec["realized"][0] == pytest.approx(rec["target"][0], abs=1e-4)
    assert rec["realized"][1] >= rec["target"][1] - 1e-4
    assert "realised" in capsys.readouterr().out
    # both objectives share a token budget (ids ≡ 0 vs ≡ 1 mod 3): their top quantiles together are unreachable
    with pytest.raises(SystemExit) as exit_:
        solve(tmp_path, "--name", "p99", "--targets", "{readability: '99%', positivity: '99%'}")
    assert exit_.value.code == 1
    assert "Suggested (interpolate" in capsys.readouterr().err
    rec = json.loads((tmp_path / "palette" / "p99" / "palette.json").read_text())
    assert not rec["feasible"] and rec["suggested"]["palette"]
    with pytest.raises(ConfigError, match="infeasible"):
        load_palette(tmp_path / "palette" / "p99" / "palette.json", OBJECTIVES)
    path = solve(tmp_path, "--name", "p99a", "--targets", "{readability: '99%', positivity: '99%'}",
                 "--auto_adjust", "interpolate")
    rec = json.loads(path.read_text())
    assert rec["feasible"] and 0 < rec["adjusted"]["rho"] < 1
    with pytest.raises(ConfigError, match="helpfulness"):
        solve(tmp_path, "--targets", "{helpfulness: '60%'}")


def test_resampling_follows_softmax_of_weighted_rewards():
    rewards = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.5, 0.5]]])
    lam = torch.tensor([1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([resample(rewards.expand(2000, -1, -1), lam, g) for _ in range(5)]).flatten()
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    expected = torch.softmax(rewards[0].double() @ lam.double(), 0)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    uniform = resample(rewards.expand(4000, -1, -1), torch.zeros(2), g)
    assert torch.bincount(uniform, minlength=4).min() > 850


def test_map_d_generates_one_response_per_prompt(tiny_lm):
    from mocd_train.models import load_causal_lm
    from mocd_train.rewards import RewardSet

    policy, tok = load_causal_lm(tiny_lm, torch.device("cpu"))
    scorer = RewardSet.from_config(["readability", "non_toxicity"])
    torch.manual_seed(0)
    decoder = MapD(policy, tok, scorer, torch.tensor([50.0, 0.0]), k=6, max_new_tokens=6)
    out = decoder.generate(["How do I bake bread?", "What is the capital of France?"])
    assert [o.prompt for o in out] == ["How do I bake bread?", "What is the capital of France?"]
    for o in out:
        (block,) = o.trace
        assert len(block["candidate_rewards"]) == 6 and sum(block["selection_weights"]) == pytest.approx(1.0)
        # a huge weight on readability picks (almost surely) the most readable candidate
        assert o.values[0] == pytest.approx(max(c[0] for c in block["candidate_rewards"]))
