import json

import pytest
import torch
from conftest import killed_at, stage

from mocd_train.config import ConfigError
from mocd_train.rewards import Normalizer
from mocd_train.tiny import synthetic_rollouts
from mocd_train.values import (
    BackboneSpec,
    ValueModel,
    build_value_model,
    value_datasets,
)

OBJECTIVES = ["readability", "positivity"]


def value_model(path, init_from="causal_lm", train_mode="full", seed=0):
    from mocd_train.models import load_tokenizer

    torch.manual_seed(seed)
    norm = Normalizer(OBJECTIVES, [0.0, 0.0], [1.0, 1.0])
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear")
    model, tok = build_value_model(BackboneSpec(path, init_from, None, train_mode), OBJECTIVES, norm,
                                   load_tokenizer(path), None, lora)
    torch.nn.init.normal_(model.head.weight)  # a zero head would make every comparison trivially equal
    torch.nn.init.normal_(model.head.bias)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval(), tok


def left_pad(seqs, pad_id):
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "gpt2-reward-model"])
def test_incremental_block_scores_equal_scoring_each_full_sequence_alone(kind, tiny_lm, tiny_rm):
    path, init_from = (tiny_lm, "causal_lm") if kind == "llama" else (tiny_rm, "reward_model")
    model, _ = value_model(path, init_from)
    g = torch.Generator().manual_seed(1)
    prompts = [[5, 9, 33, 7], [11, 12], [40, 41, 42, 43, 44, 45]]
    n, k, b = len(prompts), 3, 4
    ids, mask = left_pad(prompts, pad_id=0)
    _, state = model.prefill(ids, mask)
    history = [list(p) for p in prompts]
    for step in range(2):  # two blocks: the second continues from the winners' caches
        blocks = torch.randint(50, 300, (n, k, b), generator=g)
        bmask = torch.ones(n, k, b, dtype=torch.long)
        bmask[0, 1, 2:] = 0  # branch ended (EOS) inside the block
        if step == 1:
            bmask[2, :, :] = 0  # a finished row: no new tokens at all
        prev = torch.full((n, 2), 7.0)
        end, state = model.score_blocks(state, blocks, bmask, prev_values=prev)
        for i in range(n):
            for j in range(k):
                new = blocks[i, j][bmask[i, j].bool()].tolist()
                if not new:
                    assert torch.equal(end[i, j], prev[i])
                    continue
                seq = torch.tensor([history[i] + new])
                full, _ = model(seq, torch.ones_like(seq))
                torch.testing.assert_close(end[i, j], full[0, -1], atol=1e-4, rtol=0)
        winners = torch.tensor([1, 0, 2])
        state = state.select(torch.arange(n) * k + winners)
        for i in range(n):
            history[i] += blocks[i, winners[i]][bmask[i, winners[i]].bool()].tolist()


@pytest.mark.parametrize("train_mode", ["full", "lora", "frozen"])
def test_save_load_round_trip(train_mode, tiny_lm, tmp_path):
    model, tok = value_model(tiny_lm, train_mode=train_mode)
    ids = torch.tensor([[3, 50, 60, 70, 80]])
    before, _ = model(ids, torch.ones_like(ids))
    model.save(tmp_path / "v", tok)
    assert not (tmp_path / "v.tmp").exists()
    loaded, tok2 = ValueModel.load(tmp_path / "v", objectives=OBJECTIVES)
    after, _ = loaded(ids, torch.ones_like(ids))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert loaded.objectives == OBJECTIVES and tok2.get_vocab() == tok.get_vocab()
    stored = {p.name for p in (tmp_path / "v").iterdir()}
    assert ("backbone" in stored) == (train_mode == "full") and ("adapter" in stored) == (train_mode == "lora")
    with pytest.raises(ConfigError, match="helpfulness"):
        ValueModel.load(tmp_path / "v", objectives=["helpfulness", "harmlessness"])


def train_args(run_dir, lm, *extra):
    return ["--run_dir", str(run_dir), "--model", lm, "--objectives", f"[{', '.join(OBJECTIVES)}]",
            "--report_to", "none", "--learning_rate", "3e-3", "--heldout_fraction", "0.25", "--logging_steps", "1000",
            *extra]


def test_learns_a_synthetic_token_objective(tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=192)
    out = stage("value").main(train_args(tmp_path, tiny_lm, "--num_train_epochs", "15"))
    metrics = json.loads((out / "metrics.json").read_text())
    for g in OBJECTIVES:
        assert metrics[g]["100%"]["spearman"] >= 0.9, metrics[g]
        assert metrics[g]["100%"]["pearson"] >= 0.8, metrics[g]
        # the value sharpens as more of the response is seen
        assert metrics[g]["25%"]["mse"] > metrics[g]["100%"]["mse"]
        assert metrics[g]["25%"]["pearson"] < metrics[g]["100%"]["pearson"]
    model, _ = ValueModel.load(out / "model", objectives=OBJECTIVES)
    assert model.meta.shares_policy_tokenizer and model.normalizer.objectives == OBJECTIVES


def test_resumed_training_equals_uninterrupted(tiny_lm, tmp_path, monkeypatch):
    import mocd_train.values as values

    synthetic_rollouts(tmp_path / "a", tiny_lm, tuple(OBJECTIVES), num_prompts=32)
    synthetic_rollouts(tmp_path / "b", tiny_lm, tuple(OBJECTIVES), num_prompts=32)
    extra = ("--num_train_epochs", "3", "--save_steps", "5")
    train_value = stage("value")
    whole = train_value.main(train_args(tmp_path / "a", tiny_lm, *extra))

    real = values.value_trainer_class

    def killing_trainer():
        cls = real()

        class Dies(cls):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.add_callback(killed_at(8))  # after step 5's checkpoint

        return Dies

    monkeypatch.setattr(train_value, "value_trainer_class", killing_trainer)
    with pytest.raises(KeyboardInterrupt):
        train_value.main(train_args(tmp_path / "b", tiny_lm, *extra))
    assert not (tmp_path / "b" / "value" / "DONE.json").exists()
    monkeypatch.setattr(train_value, "value_trainer_class", real)
    resumed = train_value.main(train_args(tmp_path / "b", tiny_lm, *extra))
    assert json.loads((resumed / "DONE.json").read_text())["resumed_from"].endswith("checkpoint-5")
    a, _ = ValueModel.load(whole / "model")
    b, _ = ValueModel.load(resumed / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_objectives_must_match_the_rollouts(tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    args = train_args(tmp_path, tiny_lm)
    args[args.index("--objectives") + 1] = "[positivity, readability]"
    expected = r"objectives \['readability', 'positivity'\].*\['positivity', 'readability'\]"
    with pytest.raises(ConfigError, match=expected):
        stage("value").main(args)


def test_value_examples_mask_only_the_response(tiny_lm, tmp_path):
    from datasets import load_from_disk

    from mocd_train.values import collate_values

    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    rows = load_from_disk(str(tmp_path / "rollouts" / "dataset"))
    norm = Normalizer.load(tmp_path / "rollouts" / "normalization.json")
    model, tok = value_model(tiny_lm)
    train, _, held = value_datasets(rows, tok, model.meta, norm, 512, 0.25)
    assert len(train) + len(held) == len(rows)
    batch = collate_values(train[:4], tok.pad_token_id)
    for i, ex in enumerate(train[:4]):
        row = next(r for r in rows if list(r["response_ids"]) == ex["input_ids"][ex["response_start"]:][
            : len(r["response_ids"])] and r["prompt"] in tok.decode(ex["input_ids"][: ex["response_start"]]))
        assert int(batch["response_mask"][i].sum()) == len(row["response_ids"]) + int(row["finished"])


@pytest.mark.slow
def test_trains_under_deepspeed_zero2_launch(tiny_lm, tmp_path):
    """accelerate launch with the ZeRO-2 config on CPU (DS_ACCELERATOR=cpu); the JIT-built op is cached."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=16)
    env = {**os.environ, "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mocd_ds"))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "accelerate_configs" / "deepspeed_zero2.yaml"), "--num_processes", "1", "--mixed_precision", "no",
           str(root / "recipes" / "train_value.py"), *train_args(tmp_path, tiny_lm, "--num_train_epochs", "1")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "value" / "DONE.json").read_text())
    assert summary["deepspeed"] is True
    ValueModel.load(tmp_path / "value" / "model", objectives=OBJECTIVES)


def test_pair_accuracy_counts_pairs_by_brute_force_with_a_prompt_clustered_se():
    from itertools import combinations

    import numpy as np

    from mocd_train.values import pair_accuracy

    rng = np.random.default_rng(0)
    prompts = {f"p{i}": list(range(6 * i, 6 * i + 6)) for i in range(40)}
    t = rng.normal(size=240)
    v = np.round(t + rng.normal(size=240), 1)  # rounded: some ties in v
    hits = pairs = 0
    for idx in prompts.values():
        for i, j in combinations(idx, 2):
            if abs(t[i] - t[j]) >= 0.5:
                pairs += 1
                hits += 1.0 if (t[i] - t[j]) * (v[i] - v[j]) > 0 else 0.5 if v[i] == v[j] else 0.0
    got = pair_accuracy(v, t, prompts, 0.5)
    assert got["pairs"] == pairs and got["accuracy"] == pytest.approx(hits / pairs)
    boot = []  # the clustered SE against a bootstrap over prompts
    keys = list(prompts)
    for _ in range(2000):
        pick = rng.choice(len(keys), len(keys))
        sub = {f"{k}-{n}": prompts[keys[k]] for n, k in enumerate(pick)}
        boot.append(pair_accuracy(v, t, sub, 0.5)["accuracy"])
    assert got["se"] == pytest.approx(float(np.std(boot)), rel=0.15)
    assert pair_accuracy(v, t, {"a": [0]}, 0.5)["pairs"] == 0


def test_pairwise_loss_equals_a_loop_over_qualifying_pairs():
    import math

    from mocd_train.values import pairwise_loss

    g = torch.Generator().manual_seed(0)
    values, targets = torch.randn(6, 9, 2, generator=g), torch.randn(6, 2, generator=g)
    groups, positions = torch.tensor([0, 0, 0, 1, 1, 2]), torch.randint(0, 9, (6, 3), generator=g)
    terms = []
    for i in range(6):
        for j in range(i + 1, 6):
            for o in range(2):
                d = float(targets[i, o] - targets[j, o])
                if groups[i] == groups[j] and abs(d) >= 0.3:
                    for f in range(3):
                        gap = float(values[i, positions[i, f], o] - values[j, positions[j, f], o])
                        terms.append(math.log1p(math.exp(-math.copysign(1, d) * gap)))
    assert float(pairwise_loss(values, targets, groups, positions, 0.3)) == pytest.approx(sum(terms) / len(terms))
    assert float(pairwise_loss(values, targets, torch.arange(6), positions, 0.3)) == 0.0


def test_prompt_group_sampler_keeps_prompts_whole_and_reshuffles():
    from mocd_train.values import PromptGroupSampler

    ids = [f"p{i}" for i in range(10) for _ in range(4)] + ["short", "short"]  # one prompt lost two responses
    sampler = PromptGroupSampler(ids, seed=3)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 44 and sorted(set(first)) == list(range(42))
    for order in (first, second):
        for b in range(0, 44, 4):  # consecutive blocks of 4 are one prompt: batches of 4·c hold whole prompts
            assert len({ids[i] for i in order[b : b + 4]}) == 1
    assert first != second


def test_pairwise_term_and_validation_selection_train_end_to_end(tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=48)
    out = stage("value").main(train_args(
        tmp_path, tiny_lm, "--num_train_epochs", "4", "--pairwise_weight", "1.0", "--per_device_train_batch_size",
        "8", "--validation_fraction", "0.25", "--save_steps", "5", "--pair_margin", "0.1"))
    done = json.loads((out / "DONE.json").read_text())
    history = json.loads((out / "metrics.json").read_text())
    assert done["validation_sequences"] > 0 and done["selected_checkpoint"].startswith("checkpoint-")
    assert done["selection_metric"] == pytest.approx(max(done["validation_history"]))
    for g in OBJECTIVES:
        pa = history[g]["25%"]["within_prompt_pair_accuracy"]
        assert pa["pairs"] > 0 and 0 <= pa["accuracy"] <= 1
    synthetic_rollouts(tmp_path / "x", tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    with pytest.raises(ConfigError, match="not a multiple"):
        stage("value").main(train_args(tmp_path / "x", tiny_lm, "--pairwise_weight", "1.0",
                                              "--per_device_train_batch_size", "6"))
