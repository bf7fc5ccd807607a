"""Distillation (docs/algorithms.md §7): teacher datasets → one (prompt, response) training set → a student checkpoint
that deploys without mocd_train (weights, tokenizer with its chat template, generation config, model card)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mocd_train.assets import unit_hash
from mocd_train.atomic import atomic_dir
from mocd_train.decoding.mod import Mod, PolicySet
from mocd_train.errors import ConfigError
from mocd_train.policies import common_args, lora_config, pad_examples
from mocd_train.rewards import Normalizer
from mocd_train.rundir import teacher_dataset
from mocd_train.tensors import positions


def mix_teachers(run_dir, teachers: dict[str, float], names: list[str], normalizer: Normalizer, seed: int = 0,
                 deduplicate: bool = True, min_worst_case: float | str | None = None) -> tuple[list[dict], dict]:
    """Rows of several teachers: teacher t keeps a share w_t of its rows (chosen by a seeded hash of the prompt, so
    a run is reproducible), then repeated (prompt, response) pairs are dropped and, optionally, rows whose normalised
    worst-case reward min_g r̃_g is below a number or a quantile ('50%') of the mix."""
    from datasets import load_from_disk

    rows, stats = [], {"teachers": {}}
    for name, share in teachers.items():
        data = load_from_disk(str(teacher_dataset(run_dir, name)))
        missing = [f"reward_{g}" for g in names if f"reward_{g}" not in data.column_names]
        if missing or not {"prompt", "response"} <= set(data.column_names):
            raise ConfigError(f"teacher {name!r} lacks columns {missing or ['prompt', 'response']}; it was decoded "
                              "for other objectives or is not a teacher dataset.")
        kept = [dict(r, teacher=name) for r in data if unit_hash(r["prompt"], f"{seed}:{name}") < share]
        stats["teachers"][name] = {"rows": len(data), "kept": len(kept)}
        rows += kept
    if deduplicate:
        seen, unique = set(), []
        for r in rows:
            key = (r["prompt"].strip(), " ".join(r["response"].split()))
            if key not in seen:
                seen.add(key)
                unique.append(r)
        stats["duplicates_dropped"] = len(rows) - len(unique)
        rows = unique
    if min_worst_case is not None and rows:
        raw = torch.tensor([[r[f"reward_{g}"] for g in names] for r in rows], dtype=torch.float64)
        worst = normalizer(raw).min(1).values
        if isinstance(min_worst_case, str):
            threshold = float(torch.quantile(worst, float(min_worst_case.rstrip("%")) / 100))
        else:
            threshold = float(min_worst_case)
        keep = (worst >= threshold).tolist()
        stats["filtered_out"] = len(rows) - sum(keep)
        stats["min_worst_case"] = threshold
        rows = [r for r, k in zip(rows, keep) if k]
    rows = [r for r in rows if r["response"].strip()]
    if not rows:
        raise ConfigError("no teacher rows left after mixing, de-duplication and filtering; lower min_worst_case.")
    stats["rows"] = len(rows)
    return rows, stats


def split_heldout(rows: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """By prompt (a salted hash), so the held-out likelihood measures generalisation to new prompts."""
    held = [unit_hash(r["prompt"], f"heldout:{seed}") < fraction for r in rows]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


@torch.no_grad()
def response_logprob(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean per-token log-likelihood under `model` of the tokens the training loss covers (`completion_examples`)."""

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_examples(examples[i : i + batch_size], pad_id).items()}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float(),
                                 -1)
        token_lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # position t predicts token t + 1
        weight = batch["completion_mask"][:, 1:].to(token_lp.dtype)
        total += float((token_lp * weight).sum())
        count += int(weight.sum())
    return total / max(count, 1)


def model_card(name: str, student: str, teachers: dict, objectives: list[str], stats: dict, metrics: dict) -> str:
    lines = [f"# {name}", "",
             "A student distilled by [mocd_train](https://github.com/) from decoding-time teachers. It is "
             "a plain transformers checkpoint:", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
             f"- student (initialisation): `{student}`",
             f"- objectives: {', '.join(objectives)}",
             "- teachers (share of rows kept): " + ", ".join(f"`{t}` ({w:g})" for t, w in teachers.items()),
             f"- training rows: {stats.get('rows')} (duplicates dropped: {stats.get('duplicates_dropped', 0)}, "
             f"filtered: {stats.get('filtered_out', 0)})"]
    for key, value in metrics.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Teacher details (decoder, parameters) are in `mocd_distill.json`."]
    return "\n".join(lines) + "\n"


def export_student(model, tokenizer, out: Path, card: str, provenance: dict) -> Path:
    """One standalone checkpoint: merged weights, tokenizer + chat template, generation config, README, provenance;
    written to a temp folder, then renamed."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        (tmp / "mocd_distill.json").write_text(json.dumps(provenance, indent=2, default=str))
    return out


def token_kl_trainer(cfg, student, tokenizer, examples: list[dict], teacher, out: Path):
    """Token-level distillation from MOD (docs/algorithms.md §7): on the teacher's own samples, minimise
    KL(p_MOD(·|x, y_<t) ‖ p_student(·|x, y_<t)) summed over response positions; p_MOD is `teacher.logprobs`, the
    combined next-token distribution of the MOD decoder that wrote the dataset."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments


    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    class KLTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, mask, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
            with torch.no_grad():
                target = teacher.logprobs(ids, mask).to(logits.device)
            student_lp = torch.log_softmax(logits, -1)
            kl = (target.exp() * (target - student_lp)).sum(-1)[:, :-1]  # position t predicts token t + 1
            weight = completion[:, 1:].float()
            loss = (kl * weight).sum() / weight.sum().clamp(min=1)
            return (loss, logits) if return_outputs else loss

    if cfg.use_lora:
        from peft import get_peft_model

        student = get_peft_model(student, lora_config(cfg))
    student.train()
    args = TrainingArguments(**common_args(cfg, out, "distill"))
    return KLTrainer(model=student, args=args, train_dataset=Dataset.from_list(examples),
                     data_collator=lambda batch: pad_examples(batch, pad))


def mod_teacher(run_dir, name: str, tokenizer, policy):
    """The MOD decoder that wrote teach/<name>, rebuilt from its recorded parameters (policy = π_ref, loaded)."""

    done = Path(run_dir) / "teach" / name / "DONE.json"
    params = json.loads(done.read_text()).get("params", {}) if done.is_file() else {}
    if "rule" not in params or not params.get("policies"):
        raise ConfigError(f"token_kl: teacher {name!r} is not a MOD teacher (decoder mod) of this run; token-level "
                          "distillation needs MOD's explicit next-token distribution.")
    policies = PolicySet.for_policies([Path(p) for p in params["policies"]], policy, params["rule"])
    for p in policies.models:
        p.requires_grad_(False)
    return Mod(policies, tokenizer, params["weights"], params["rule"], params.get("alpha", 0.5),
               params.get("jsd_approximation", False))
