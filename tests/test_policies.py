import json

import pytest
import torch
from conftest import killed_at, stage

from mocd_train.config import ConfigError
from mocd_train.rewards.base import register
from mocd_train.tiny import synthetic_rollouts

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


def rewards_rose(summary, n=4, by=0.5):
    """The mean logged reward of the last n steps beats the first n's by `by` (normalised units)."""
    r = summary["rewards"]
    return sum(r[-n:]) / n > sum(r[:n]) / n + by


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_dpo_margin_grows_for_every_divergence(divergence, tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=32)
    out = stage("policies").main(policy_args(
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


def test_dpo_closes_only_finished_answers(tiny_lm, tmp_path):
    """TRL ends every answer with the template's end of turn; an answer cut at max_new_tokens must not have it, or
    DPO would train the stop token on text that did not stop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mocd_train.config import load_config
    from mocd_train.policies import dpo_trainer, end_of_turn

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    suffix = end_of_turn(tok)
    assert tok.decode(suffix) == "<|im_end|>\n"  # the tiny ChatML template
    user = [{"role": "user", "content": "q"}]
    pairs = [{"prompt": user, "chosen": [{"role": "assistant", "content": "good answer"}],
              "rejected": [{"role": "assistant", "content": "bad answer"}],
              "chosen_finished": finished, "rejected_finished": not finished, "score_margin": 1.0}
             for finished in (True, False)]
    cfg = load_config("policies", policy_args(tmp_path, tiny_lm, "--method", "dpo", "--objective", "readability"))
    data = dpo_trainer(cfg, AutoModelForCausalLM.from_pretrained(tiny_lm), tok, pairs, tmp_path / "dpo").train_dataset
    answer = tok("good answer", add_special_tokens=False)["input_ids"]
    assert data[0]["chosen_ids"] == answer + suffix and data[1]["chosen_ids"] == answer
    assert data[0]["rejected_ids"][-len(suffix):] != suffix and data[1]["rejected_ids"][-len(suffix):] == suffix


def test_grpo_raises_a_learnable_reward(tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, ("brevity", "positivity"), num_prompts=16)
    out = stage("policies").main(policy_args(
        tmp_path, tiny_lm, "--method", "grpo", "--objective", "brevity", "--use_lora", "false",
        "--learning_rate", "1e-2", "--max_steps", "30", "--max_prompts", "16", "--max_completion_length", "8",
        "--num_generations", "8", "--per_device_train_batch_size", "16", objectives=["brevity", "positivity"]))
    summary = json.loads((out / "DONE.json").read_text())
    assert rewards_rose(summary), summary["rewards"]
    from transformers import AutoModelForCausalLM  # the trained full model loads

    AutoModelForCausalLM.from_pretrained(out / "model")


def test_sft_on_a_teacher_dataset_then_merge(tiny_lm, tmp_path):
    from datasets import Dataset

    from mocd_train.models import load_policy

    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    teacher = tmp_path / "teach" / "t" / "dataset"
    Dataset.from_list([{"prompt": f"question {i}", "response": "Paris is the capital of France."}
                       for i in range(16)]).save_to_disk(str(teacher))
    out = stage("policies").main(policy_args(tmp_path, tiny_lm, "--method", "sft", "--sft_dataset", "t",
                                                  "--learning_rate", "2e-2", "--max_steps", "20", "--merge", "true"))
    losses = json.loads((out / "DONE.json").read_text())["losses"]
    assert losses[-1] < losses[0] - 0.5  # it learns the teacher's answer
    model, tok = load_policy(out)
    assert (out / "merged").is_dir() and (out / "adapter").is_dir() and model.config.num_hidden_layers == 2


def test_a_policy_folder_is_a_model_with_or_without_its_merged_checkpoint(tiny_lm, tmp_path):
    import shutil

    from mocd_train.models import load_causal_lm

    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=16)
    out = stage("policies").main(policy_args(tmp_path, tiny_lm, "--method", "dpo", "--objective", "readability",
                                                  "--learning_rate", "5e-3", "--max_steps", "4", "--merge", "true"))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    logits = {}
    for label in ("merged", "adapter only"):
        model, tok = load_causal_lm(str(out), torch.device("cpu"))
        assert tok.padding_side == "left"
        logits[label] = model(ids).logits
        shutil.rmtree(out / "merged", ignore_errors=True)
    base, _ = load_causal_lm(tiny_lm, torch.device("cpu"))
    torch.testing.assert_close(logits["merged"], logits["adapter only"], atol=1e-5, rtol=0)
    assert (logits["merged"] - base(ids).logits).abs().max() > 1e-3  # the trained weights, not the base model
    with pytest.raises(ConfigError, match="no such folder.*policies/<name>"):
        load_causal_lm(str(out / "merged"), torch.device("cpu"))


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
    (["--method", "grpo", "--palette", "nope"], "does not exist"),
    (["--method", "dpo", "--palette", "p"], "GRPO or PPO"),
    (["--method", "ppo", "--palette", "p", "--beta", "0"], "β > 0"),
    (["--method", "grpo", "--palette", "p", "--objective", "readability"], "exactly one"),
    (["--method", "ppo", "--objective", "readability", "--use_vllm", "true"], "only GRPO generates through vLLM"),
])
def test_clear_errors(extra, match, tiny_lm, tmp_path):
    if "nope" in extra:
        synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=4)
    with pytest.raises(ConfigError, match=match):
        stage("policies").main(policy_args(tmp_path, tiny_lm, *extra))


def test_grpo_takes_trls_vllm_options_only_with_a_vllm_in_trls_window(monkeypatch):
    import importlib.metadata

    from mocd_train.config import PolicyConfig
    from mocd_train.policies import vllm_args

    cfg = PolicyConfig(objectives=["readability"], method="grpo", objective="readability", use_vllm=True,
                       vllm_mode="server", vllm_server_base_url="http://gpu-node:8000")
    for have, ok in [(None, False), ("0.18.1", False), ("0.19.0", True), ("0.27.1", True), ("0.27.1.post1", True),
                     ("0.32.0", False)]:
        def fake(name, have=have):
            if have is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return have

        monkeypatch.setattr(importlib.metadata, "version", fake)
        if ok:
            assert vllm_args(cfg) == {"use_vllm": True, "vllm_mode": "server",
                                      "vllm_server_base_url": "http://gpu-node:8000"}
        else:
            with pytest.raises(ConfigError, match=r"0\.19\.0–0\.27\.1"):
                vllm_args(cfg)
    cfg.use_vllm = False
    assert vllm_args(cfg) == {}


def test_ppo_raises_a_learnable_reward(tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, ("brevity", "positivity"), num_prompts=16)
    out = stage("policies").main(policy_args(
        tmp_path, tiny_lm, "--method", "ppo", "--objective", "brevity", "--use_lora", "false",
        "--learning_rate", "1e-2", "--max_steps", "24", "--max_prompts", "16", "--max_completion_length", "8",
        "--per_device_train_batch_size", "8", "--num_ppo_epochs", "2", "--beta", "0.01",
        objectives=["brevity", "positivity"]))
    summary = json.loads((out / "DONE.json").read_text())
    assert summary["steps"] == 24 and len(summary["rewards"]) == 24
    assert rewards_rose(summary), summary["rewards"]
    assert (out / "model" / "config.json").is_file()


def test_text_reward_scores_what_trl_ppo_reads(tiny_lm):
    """TRL's get_reward on left-padded prompt + right-padded response reads w·r̃ of the decoded (prompt, response)."""
    from trl.experimental.utils import get_reward

    from mocd_train.policies import TextReward
    from mocd_train.rewards import Normalizer
    from mocd_train.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    prompts = ["a short one", "a much longer prompt here"]
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False) for p in prompts]
    keys = {TextReward.key(i, tok.pad_token_id): p for i, p in zip(ids, prompts)}
    seen = []

    class Recorder:
        def score(self, ps, rs):
            seen.append((ps, rs))
            return torch.tensor([[len(r), 1.0] for r in rs])

    norm = Normalizer(["brevity", "positivity"], [2.0, 0.0], [4.0, 1.0])
    reward = TextReward(tok, keys, Recorder(), norm, [0.5, 0.0])
    responses = [tok.encode("yes", add_special_tokens=False), tok.encode("no way", add_special_tokens=False)]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    rows = [[pad] * (width - len(i)) + i + r + [tok.eos_token_id] + [pad] * (5 - len(r))
            for i, r in zip(ids, responses)]
    _, score, _ = get_reward(reward, torch.tensor(rows), pad, width)
    texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
    assert seen == [(prompts, texts)]
    torch.testing.assert_close(score, torch.tensor([0.5 * (len(t) - 2) / 4 for t in texts]))


def test_map_f_trains_on_beta_lambda_r_with_raw_rewards(tiny_lm, tmp_path):
    """MAP-F: reward β·λᵀr on raw rewards, no per-group std scaling, so the KL-regularised optimum is p_λ."""
    synthetic_rollouts(tmp_path, tiny_lm, ("brevity", "positivity"), num_prompts=16)
    stage("palette").main(["--run_dir", str(tmp_path), "--objectives", "[brevity, positivity]",
                                  "--report_to", "none", "--name", "short", "--targets", "{brevity: '70%'}"])
    palette = json.loads((tmp_path / "palette" / "short" / "palette.json").read_text())
    assert palette["feasible"] and palette["lam"][0] > 0
    out = stage("policies").main(policy_args(
        tmp_path, tiny_lm, "--method", "grpo", "--palette", "short", "--beta", "0.5", "--max_steps", "2",
        "--max_prompts", "8", "--max_completion_length", "8", "--per_device_train_batch_size", "8",
        objectives=["brevity", "positivity"]))
    summary = json.loads((out / "DONE.json").read_text())
    assert out.name == "map-f-short-grpo" and summary["reward_scale"] == "raw"
    assert summary["reward_weights"] == pytest.approx([0.5 * lam for lam in palette["lam"]])


@pytest.mark.slow
def test_dpo_with_lora_under_deepspeed_zero2_launch(tiny_lm, tmp_path):
    """accelerate launch with the ZeRO-2 config on CPU; the saved adapter holds the trained weights (ZeRO-3 would
    partition them away: save_policy refuses that)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).parents[1]
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=16)
    env = {**os.environ, "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mocd_ds"))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "accelerate_configs" / "deepspeed_zero2.yaml"), "--num_processes", "1", "--mixed_precision", "no",
           str(root / "recipes" / "train_policy.py"),
           *policy_args(tmp_path, tiny_lm, "--method", "dpo", "--objective", "readability", "--max_steps", "4",
                        "--learning_rate", "2e-3", "--per_device_train_batch_size", "4")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "policies" / "readability-dpo"
    summary = json.loads((out / "DONE.json").read_text())
    assert summary["deepspeed"] is True and summary["steps"] == 4
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


def test_killed_dpo_run_resumes_to_the_uninterrupted_result(tiny_lm, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    extra = ("--method", "dpo", "--objective", "readability", "--learning_rate", "2e-3", "--max_steps", "8",
             "--save_steps", "4", "--per_device_train_batch_size", "4")
    for run in ("a", "b"):
        synthetic_rollouts(tmp_path / run, tiny_lm, tuple(OBJECTIVES), num_prompts=32)
    train_policy = stage("policies")
    whole = train_policy.main(policy_args(tmp_path / "a", tiny_lm, *extra))

    real = train_policy.dpo_trainer
    killed = killed_at(6)  # after the checkpoint at step 4
    monkeypatch.setattr(train_policy, "dpo_trainer", lambda *a, **kw: _with(real(*a, **kw), killed))
    with pytest.raises(KeyboardInterrupt):
        train_policy.main(policy_args(tmp_path / "b", tiny_lm, *extra))
    monkeypatch.setattr(train_policy, "dpo_trainer", real)
    resumed = train_policy.main(policy_args(tmp_path / "b", tiny_lm, *extra))
    assert json.loads((resumed / "DONE.json").read_text())["resumed_from"].endswith("checkpoint-4")
    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (whole, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def _with(trainer, callback):
    trainer.add_callback(callback)
    return trainer
