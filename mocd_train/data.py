"""Chat formatting and rollouts: K sampled responses per prompt from π_ref, scored by every objective.

Reproducibility: prompts are cut into fixed chunks of `chunk_size`; chunk c is generated as one batch after
`torch.manual_seed(chunk_seed(seed, c))`. A chunk's samples therefore depend only on (model, config, seed, c) — not on
how many processes share the work (chunk c goes to rank c mod world size) nor on interruptions (a finished chunk is
a file written atomically and never redone). Bit-equality across machines additionally needs the same torch build
and device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mocd_train.assets import Prompt
from mocd_train.atomic import atomic_dir
from mocd_train.errors import ConfigError
from mocd_train.rewards import Normalizer, RewardSet
from mocd_train.rundir import atomic_write_json, is_complete, stage_dir


def chat_texts(tokenizer, prompts: list[str], system_prompt: str | None = None) -> list[str]:
    """Prompts as the policy sees them: its chat template with a generation prompt (plain text if it has none)."""
    if not tokenizer.chat_template:
        return list(prompts)
    texts = []
    for p in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": p}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


def chunk_seed(seed: int, chunk: int) -> int:
    return (seed * 1_000_003 + chunk) % 2**63


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def pad_id(tokenizer, stop: list[int]) -> int:
    """The id that fills a branch after it ended: the tokenizer's pad token, else its first stop token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], num_samples: int, max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None) -> list[dict]:
    """num_samples responses per prompt, prompt-major; pure temperature/top-p sampling (no top-k, no penalties).
    `model` is a Hugging Face causal LM (`generate`) or a sampling backend (decoding/backends.py: one block of
    max_new_tokens with K = num_samples), such as vLLM's."""
    texts = chat_texts(tokenizer, prompts, system_prompt)
    if hasattr(model, "sample"):
        if (model.temperature, model.top_p) != (temperature, top_p):
            raise ValueError(f"the backend samples at temperature {model.temperature}, top_p {model.top_p}; asked "
                             f"for {temperature}, {top_p}.")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        model.open(ids, num_samples)
        toks, mask, _ = model.sample(max_new_tokens, True, None)
        seqs = [[t for t, m in zip(r, rm) if m] for r, rm in zip(toks.tolist(), mask.tolist())]
        prompt_lens, stop = [len(i) for i in ids], set(model.stop_ids)
    else:
        from transformers import GenerationConfig

        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        stop = eos_ids(model, tokenizer)
        gen = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                               max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        seqs = model.generate(**enc, generation_config=gen)[:, enc["input_ids"].shape[1]:].tolist()
        prompt_lens = enc["attention_mask"].sum(1).tolist()
    rows = []
    for i, seq in enumerate(seqs):
        j = next((t for t, tok in enumerate(seq) if tok in stop), None)
        ids = seq if j is None else seq[:j]
        rows.append({
            "response": tokenizer.decode(ids, skip_special_tokens=True).strip(),
            "response_ids": ids,
            "num_prompt_tokens": int(prompt_lens[i // num_samples]),
            "num_response_tokens": len(ids),
            "finished": j is not None,
        })
    return rows


def chunk_path(shard_dir: Path, chunk: int) -> Path:
    return shard_dir / f"chunk-{chunk:05d}.json"


def _ids(chunk: list) -> list[str]:
    return [getattr(item, "id", str(item)) for item in chunk]


def _read_chunk(path: Path, expected: list[str] | None = None) -> dict:
    """One chunk file; a damaged one, or one made for other prompts (the prompts changed under a resumed stage), is an
    error that names the file and the way out."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged ({e.__class__.__name__}: {e}); delete it and re-run the stage — that "
                          "chunk will be regenerated.") from None
    if expected is not None and data.get("ids") is not None and data["ids"] != expected:
        raise ConfigError(f"{path} was made for other prompts than this run's chunk {data.get('chunk')} (the prompts "
                          "changed since the stage started). Restore them, or pass --overwrite true to start over.")
    return data


def run_chunks(items: list, chunk_size: int, shard_dir: Path, work, *, rank: int = 0, world_size: int = 1,
               desc: str = "work", unit: str = "item") -> None:
    """Cut `items` into fixed chunks; this rank does chunks c ≡ rank (mod world_size) that have no file yet.
    `work(c, chunk)` returns (rows, new_tokens, seconds, extra dict); each chunk is written atomically as one JSON
    file with the ids of the items it covers, so a killed run resumes at its first missing chunk, never mistakes a
    partial file for a finished one, and refuses to resume onto different items."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(items) + chunk_size - 1) // chunk_size
    for c in range(rank, n_chunks, world_size):  # what is already done must be what would be done now
        if chunk_path(shard_dir, c).is_file():
            _read_chunk(chunk_path(shard_dir, c), _ids(items[c * chunk_size : (c + 1) * chunk_size]))
    mine = [c for c in range(rank, n_chunks, world_size) if not chunk_path(shard_dir, c).is_file()]
    total = sum(len(items[c * chunk_size : (c + 1) * chunk_size]) for c in mine)
    bar = tqdm(total=total, desc=f"{desc}[rank {rank}]", unit=unit, disable=rank != 0 and world_size > 1)
    tokens, seconds = 0, 0.0
    for c in mine:
        chunk = items[c * chunk_size : (c + 1) * chunk_size]
        rows, new_tokens, secs, extra = work(c, chunk)
        atomic_write_json(chunk_path(shard_dir, c), {"chunk": c, "rank": rank, "world_size": world_size,
                                                     "new_tokens": new_tokens, **extra, "ids": _ids(chunk),
                                                     "rows": rows})
        tokens, seconds = tokens + new_tokens, seconds + secs
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
    bar.close()


def read_chunks(shard_dir: Path, items: list, chunk_size: int, stage: str) -> list[dict]:
    """Every chunk file of a finished stage, in order, each checked to cover its items; a missing one is an error
    that says how to finish it."""
    n_chunks = (len(items) + chunk_size - 1) // chunk_size
    missing = [c for c in range(n_chunks) if not chunk_path(shard_dir, c).is_file()]
    if missing:
        raise RuntimeError(f"{stage}: chunks {missing[:10]} are missing in {shard_dir}; re-run the stage to finish "
                           "them.")
    return [_read_chunk(chunk_path(shard_dir, c), _ids(items[c * chunk_size : (c + 1) * chunk_size]))
            for c in range(n_chunks)]


def save_dataset(rows: list[dict], final: Path) -> None:
    """A `datasets` dataset written to a temp folder, then renamed into place."""
    from datasets import Dataset

    with atomic_dir(final) as tmp:
        Dataset.from_list(rows).save_to_disk(str(tmp))


def write_rollout_shards(prompts: list[Prompt], model, tokenizer, rewards: RewardSet, shard_dir: Path, *,
                         seed: int, chunk_size: int, num_samples: int, max_new_tokens: int, temperature: float,
                         top_p: float, system_prompt: str | None, rank: int = 0, world_size: int = 1) -> None:
    """Generate and score this rank's unfinished chunks, each written atomically to its own file."""

    def work(c, chunk):
        torch.manual_seed(chunk_seed(seed, c))
        t0 = time.perf_counter()
        rows = sample_responses(model, tokenizer, [p.text for p in chunk], num_samples, max_new_tokens,
                                temperature, top_p, system_prompt)
        t1 = time.perf_counter()
        texts = [p.text for p in chunk for _ in range(num_samples)]
        scores = rewards.score(texts, [r["response"] for r in rows])
        t2 = time.perf_counter()
        for k, row in enumerate(rows):
            p = chunk[k // num_samples]
            row.update(prompt_id=p.id, prompt=p.text, source=p.source, category=p.category,
                       harmful=p.harmful, sample=k % num_samples)
            row.update({f"reward_{name}": float(v) for name, v in zip(rewards.names, scores[k].tolist())})
        new_tokens = sum(r["num_response_tokens"] + r["finished"] for r in rows)
        return rows, new_tokens, t1 - t0, {"gen_seconds": t1 - t0, "score_seconds": t2 - t1}

    run_chunks(prompts, chunk_size, shard_dir, work, rank=rank, world_size=world_size, desc="rollouts",
               unit="prompt")


def merge_rollouts(prompts: list[Prompt], shard_dir: Path, out_dir: Path, objectives: list[str], chunk_size: int,
                   normalization: str) -> dict:
    """All chunk files → one `datasets` dataset + normalisation stats; returns the summary for DONE.json."""
    shards = read_chunks(shard_dir, prompts, chunk_size, "rollouts")
    rows = [r for s in shards for r in s["rows"]]
    raw = torch.tensor([[r[f"reward_{n}"] for n in objectives] for r in rows], dtype=torch.float64)
    normalizer = Normalizer.fit(objectives, raw, normalization)
    normalizer.save(out_dir / "normalization.json")
    final = out_dir / "dataset"
    save_dataset(rows, final)
    gen_s = sum(s["gen_seconds"] for s in shards)
    tokens = sum(s["new_tokens"] for s in shards)
    return {
        "rows": len(rows), "prompts": len(prompts), "objectives": objectives,
        "mean_raw_reward": dict(zip(objectives, raw.mean(0).tolist())),
        "std_raw_reward": dict(zip(objectives, raw.std(0).tolist())),
        "new_tokens": tokens, "generation_seconds": gen_s, "tokens_per_second": tokens / max(gen_s, 1e-9),
        "responses_per_second": len(rows) / max(gen_s, 1e-9),
        "scoring_seconds": sum(s["score_seconds"] for s in shards),
        "finished_fraction": sum(r["finished"] for r in rows) / max(len(rows), 1),
        "dataset": str(final), "normalization": str(out_dir / "normalization.json"),
    }


def rollouts_config(run_dir: str | Path) -> dict:
    """The saved config of a run's rollouts: its prompt sets, split and system prompt are what later stages reuse."""
    import yaml


    path = stage_dir(run_dir, "rollouts") / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no rollouts in {path.parent}; run recipes/rollouts.py with run_dir {run_dir} first.")
    return yaml.safe_load(path.read_text()) or {}


def load_rollouts(run_dir: str | Path):
    """(dataset, normalizer) of a completed rollouts stage."""
    from datasets import load_from_disk


    d = stage_dir(run_dir, "rollouts")
    if not is_complete(d):
        raise FileNotFoundError(f"no complete rollouts in {d}; run recipes/rollouts.py with run_dir {run_dir} first.")
    return load_from_disk(str(d / "dataset")), Normalizer.load(d / "normalization.json")
