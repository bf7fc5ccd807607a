import json
import subprocess
import sys

import pytest
import torch
from conftest import stage
from datasets import Dataset

from mocd_train.config import ConfigError
from mocd_train.tiny import synthetic_rollouts

OBJECTIVES = ["readability", "positivity"]
ANSWERS = ["Paris is the capital of France.", "Birds like seeds and fresh water.", "Sleep well and drink water."]


def teacher(run_dir, name, rows):
    Dataset.from_list(rows).save_to_disk(str(run_dir / "teach" / name / "dataset"))


def teacher_rows(n, offset=0):
    return [{"prompt": f"question {i}: tell me something", "response": ANSWERS[i % 3],
             "reward_readability": float(i), "reward_positivity": 100.0}
            for i in range(offset, offset + n)]


def distill_args(run_dir, lm, *extra):
    return ["--run_dir", str(run_dir), "--model", lm, "--objectives", f"[{', '.join(OBJECTIVES)}]",
            "--report_to", "none", "--logging_steps", "1", *extra]


def test_student_learns_the_teacher_and_deploys_without_mocd_train(tiny_lm, tmp_path):
    """Full fine-tuning (the ZeRO-3 path): held-out teacher likelihood rises; the checkpoint runs in plain
    transformers."""
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=4)
    teacher(tmp_path, "rmod", teacher_rows(48))
    out = stage("distill").main(distill_args(tmp_path, tiny_lm, "--teachers", "{rmod: 1.0}", "--use_lora", "false",
                                              "--learning_rate", "1e-2", "--max_steps", "30",
                                              "--heldout_fraction", "0.25"))
    summary = json.loads((out / "DONE.json").read_text())
    assert summary["heldout_rows"] > 0 and summary["train_rows"] + summary["heldout_rows"] == 48
    assert summary["heldout_logprob_after"] > summary["heldout_logprob_before"] + 2.0  # new prompts, same answers
    student = out / "student"
    assert "rmod" in (student / "README.md").read_text()
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"p = {str(student)!r}; tok = AutoTokenizer.from_pretrained(p)\n"
            "m = AutoModelForCausalLM.from_pretrained(p)\n"
            "text = tok.apply_chat_template([{'role': 'user', 'content': 'question 99: tell me something'}], "
            "tokenize=False, add_generation_prompt=True)\n"
            "ids = tok(text, return_tensors='pt', add_special_tokens=False)\n"
            "out = m.generate(**ids, max_new_tokens=8, do_sample=False)\n"
            "assert 'mocd_train' not in sys.modules\n"
            "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().split()[0] in {a.split()[0] for a in ANSWERS}  # it answers like its teacher


def test_lora_student_merged_logits_equal_the_adapter_model(tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=4)
    teacher(tmp_path, "rmod", teacher_rows(16))
    out = stage("distill").main(distill_args(tmp_path, tiny_lm, "--teachers", "{rmod: 1.0}", "--learning_rate",
                                              "2e-2", "--max_steps", "4"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    with torch.no_grad():
        reference = base(ids).logits
        adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=0)
        assert (merged(ids).logits - reference).abs().max() > 1e-3  # the adapter was trained


def test_mixing_deduplication_and_filtering(tiny_lm, tmp_path):
    from mocd_train.distill import mix_teachers
    from mocd_train.rewards import Normalizer

    norm = Normalizer(OBJECTIVES, [0.0, 0.0], [1.0, 1.0])
    teacher(tmp_path, "a", teacher_rows(40))
    teacher(tmp_path, "b", teacher_rows(40))  # the same rows: all duplicates of a's
    rows, stats = mix_teachers(tmp_path, {"a": 1.0, "b": 1.0}, OBJECTIVES, norm)
    assert stats["rows"] == 40 and stats["duplicates_dropped"] == 40
    rows, stats = mix_teachers(tmp_path, {"a": 0.5}, OBJECTIVES, norm)
    assert 10 < len(rows) < 30 and rows == mix_teachers(tmp_path, {"a": 0.5}, OBJECTIVES, norm)[0]  # seeded
    rows, stats = mix_teachers(tmp_path, {"a": 1.0}, OBJECTIVES, norm, min_worst_case="50%")
    assert len(rows) == 20 and min(r["reward_readability"] for r in rows) == 20  # worst case = readability here
    with pytest.raises(ConfigError, match="no dataset"):
        mix_teachers(tmp_path, {"nope": 1.0}, OBJECTIVES, norm)


def test_completion_examples_end_only_finished_responses_and_train_as_built(tiny_lm, tmp_path):
    """A response cut at max_new_tokens gets no EOS (the student must not learn to stop mid-sentence); a finished one
    does; the decoder's own ids are kept; TRL trains on exactly these tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mocd_train.config import load_config
    from mocd_train.policies import completion_examples, sft_trainer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    text = "Birds like seeds"
    own = tok(text, add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "q1", "response": text, "response_ids": own, "finished": True},
            {"prompt": "q2", "response": text, "response_ids": own, "finished": False},
            {"prompt": "q3", "response": text, "response_ids": [7, 7, 7], "finished": False},  # another model's ids
            {"prompt": "q4", "response": text}]  # a plain (prompt, response) dataset: complete answers
    done, cut, foreign, plain = completion_examples(rows, tok)
    completion = lambda ex: [i for i, m in zip(ex["input_ids"], ex["completion_mask"]) if m]  # noqa: E731
    assert completion(done) == own + [tok.eos_token_id]
    assert completion(cut) == own and completion(foreign) == own and completion(plain) == own + [tok.eos_token_id]
    prompt_len = len(done["input_ids"]) - len(own) - 1
    assert completion_examples(rows[:1], tok, max_length=prompt_len) == []  # the prompt alone fills max_length

    cfg = load_config("distill", distill_args(tmp_path, tiny_lm, "--teachers", "{t: 1.0}"))
    trainer = sft_trainer(cfg, AutoModelForCausalLM.from_pretrained(tiny_lm), tok, [done, cut], tmp_path / "sft")
    for ex, built in zip(trainer.train_dataset, [done, cut]):
        assert ex["input_ids"] == built["input_ids"]
        assert [t for t in ex["labels"] if t != -100] == completion(built)


@pytest.mark.parametrize("extra,match", [
    ([], "teachers"),
    (["--teachers", "{a: 2.0}"], "share"),
    (["--teachers", "{a: 1.0}", "--min_worst_case", "half"], "quantile"),
])
def test_distill_config_errors(tiny_lm, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        stage("distill").main(distill_args(tmp_path, tiny_lm, *extra))


def test_token_level_distillation_from_mod_reduces_the_kl(tiny_lm, tmp_path):
    from test_mod import random_adapter

    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=4)
    for i, name in enumerate(["a", "b"]):
        random_adapter(tiny_lm, tmp_path / "policies" / name / "adapter", seed=i)
    stage("teach").main(["--run_dir", str(tmp_path), "--model", tiny_lm, "--objectives", "[readability, positivity]",
                          "--report_to", "none", "--decoder", "mod", "--name", "mod-t", "--policies", "[a, b]",
                          "--mod_weights", "[0.3, 0.7]", "--divergence", "forward_kl", "--max_prompts", "16",
                          "--max_new_tokens", "12", "--batch_size", "8"])
    out = stage("distill").main(distill_args(tmp_path, tiny_lm, "--teachers", "{mod-t: 1.0}", "--loss", "token_kl",
                                              "--use_lora", "false", "--learning_rate", "5e-3", "--max_steps", "12",
                                              "--per_device_train_batch_size", "4", "--heldout_fraction", "0.0"))
    losses = json.loads((out / "DONE.json").read_text())["losses"]
    assert losses[-1] < 0.5 * losses[0], losses  # KL(p_MOD ‖ p_student) on the teacher's samples falls
    with pytest.raises(ConfigError, match="not a MOD teacher"):
        teacher(tmp_path, "plain", teacher_rows(8))
        stage("distill").main(distill_args(tmp_path, tiny_lm, "--teachers", "{plain: 1.0}", "--loss", "token_kl",
                                            "--name", "x"))
