import json

import pytest
import torch

from mocd_train.config import ConfigError
from mocd_train.rewards.base import register
from mocd_train.tiny import synthetic_rollouts
from test_rollouts import recipe

OBJECTIVES = ["readability", "positivity"]


@register("brevity", "tests: shorter responses score higher (learnable by a tiny random model)")
class Brevity:
    def __init__(self, name: str = "brevity", device="cpu"):
        self.name = name

    def __call__(self, prompts, responses):
        return torch.tensor([-len(r) / 10 for r in responses], dtype=torch.float)


def policy_args(run_dir, lm, *extra, objectives=OBJECTIVES):
    return ["--run_dir", str(run_dir), "--model", lm, "--objectives", f"[{', '.join(objectives)}]",
            "--report_to", "none", "--logging_steps", "1", *extra]


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_dpo_margin_grows_for_every_divergence(divergence, tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=32)
    out = recipe("train_policy").main(policy_args(
        tmp_path, tiny_lm, "--method", "dpo", "--objective", "readability", "--divergence", divergence,
        "--learning_rate", "2e-3", "--max_steps", "16", "--logging_steps", "4"))
    summary = json.loads((out / "DONE.json").read_text())
    history = summary["last_logs"]
    assert summary["pairs"] == 32 and summary["steps"] == 16
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert margins[-1] > margins[0] and margins[-1] > 0.01  # chosen-over-rejected log-ratio margin grows
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "checkpoints").exists()


def test_preference_pairs_take_best_and_worst_by_weighted_normalised_reward(tiny_lm, tmp_path):
    from datasets import load_from_disk

    from mocd_train.policies import preference_pairs
    from mocd_train.rewards import Normalizer

    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    rows = list(load_from_disk(str(tmp_path / "rollouts" / "dataset")))
    norm = Normalizer.load(tmp_path / "rollouts" / "normalization.json")
    pairs, stats = preference_pairs(rows, OBJECTIVES, norm, [0.25, 0.75])
    assert stats == {"pairs": 8, "prompts_without_pair": 0}
    for pair in pairs:
        group = [r for r in rows if r["prompt"] == pair["prompt"][-1]["content"]]
        score = {r["response"]: 0.25 * (r["reward_readability"] - norm.mean[0]) / norm.std[0]
                 + 0.75 * (r["reward_positivity"] - norm.mean[1]) / norm.std[1] for r in group}
        assert score[pair["chosen"][0]["content"]] == pytest.approx(max(score.values()))
        assert score[pair["rejected"][0]["content"]] == pytest.approx(min(score.values()))
    with pytest.raises(ConfigError, match="no preference pairs"):
        preference_pairs(rows, OBJECTIVES, norm, [1.0, 0.0], margin=1e9)


def test_grpo_raises_a_learnable_reward(tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, ("brevity", "positivity"), num_prompts=16)
    out = recipe("train_policy").main(policy_args(
        tmp_path, tiny_lm, "--method", "grpo", "--objective", "brevity", "--use_lora", "false",
        "--learning_rate", "1e-2", "--max_steps", "30", "--max_prompts", "16", "--max_completion_length", "8",
        "--num_generations", "8", "--per_device_train_batch_size", "16", objectives=["brevity", "positivity"]))
    assert (out / "model" / "config.json").is_file()
    from transformers import AutoModelForCausalLM  # the trained full model loads

    AutoModelForCausalLM.from_pretrained(out / "model")


def test_sft_on_a_teacher_dataset_then_merge(tiny_lm, tmp_path):
    from datasets import Dataset

    from mocd_train.policies import load_policy

    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    teacher = tmp_path / "teach" / "t" / "dataset"
    Dataset.from_list([{"prompt": f"question {i}", "response": "Paris is the capital of France."}
                       for i in range(16)]).save_to_disk(str(teacher))
    out = recipe("train_policy").main(policy_args(tmp_path, tiny_lm, "--method", "sft", "--sft_dataset", "t",
                                                  "--learning_rate", "2e-2", "--max_steps", "20", "--merge", "true"))
    losses = json.loads((out / "DONE.json").read_text())["losses"]
    assert losses[-1] < losses[0] - 0.5  # it learns the teacher's answer
    model, tok = load_policy(out)
    assert (out / "merged").is_dir() and (out / "adapter").is_dir() and model.config.num_hidden_layers == 2


def test_soup_equals_the_hand_computed_delta_w_mix(tiny_lm, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mocd_train.policies import soup

    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    deltas, paths = [], {}
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        model.save_pretrained(tmp_path / name)
        merged = model.merge_and_unload()
        deltas.append({k: v - base.state_dict()[k] for k, v in merged.state_dict().items()})
        paths[name] = str(tmp_path / name)
    out = soup(paths, {"a": 0.3, "b": 0.7}, tmp_path / "soup")
    mixed = AutoModelForCausalLM.from_pretrained(out).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    expected = base.state_dict()[key] + 0.3 * deltas[0][key] + 0.7 * deltas[1][key]
    torch.testing.assert_close(mixed[key], expected, atol=1e-6, rtol=0)
    assert deltas[0][key].abs().max() > 1e-3  # the adapters really change the weights
    with pytest.raises(ConfigError, match="soup weights"):
        soup(paths, {"a": 1.0}, tmp_path / "bad")


@pytest.mark.parametrize("extra,match", [
    (["--method", "dpo"], "exactly one"),
    (["--method", "dpo", "--objective", "readabilty"], "Did you mean"),
    (["--method", "dpo", "--weights", "{readability: 1, humor: 1}"], "humor"),
    (["--method", "dpo", "--objective", "readability", "--divergence", "hellinger"], "hellinger"),
    (["--method", "dpo", "--objective", "readability", "--divergence", "js", "--loss_type", "bco_pair"], "bco_pair"),
    (["--method", "grpo", "--objective", "readability", "--divergence", "js"], "DPO"),
    (["--method", "sft"], "sft_dataset"),
])
def test_clear_errors(extra, match, tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match=match):
        recipe("train_policy").main(policy_args(tmp_path, tiny_lm, *extra))
