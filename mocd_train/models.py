"""Loading causal LMs and their tokenizers: embedded names, hub ids and local checkpoints alike."""

from __future__ import annotations

import torch

from mocd_train.assets import resolve_model


def process_state(device: str = "auto"):
    """accelerate's process state. Without CUDA it must be asked for the CPU explicitly: otherwise processes
    started by `accelerate launch --num_processes N` each run alone as rank 0 of 1 (no gloo group is formed)."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def resolve_device(device: str, default: torch.device | str = "cpu") -> torch.device:
    return torch.device(default if device == "auto" else device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 is ~7x slower than fp32 on this kind of CPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, device: torch.device, dtype: str = "auto", cache_dir: str | None = None):
    """(model in eval mode on `device`, left-padding tokenizer) for an embedded name, hub id, checkpoint folder or
    trained policy folder (policies/<name>: its merged/ checkpoint, else its LoRA adapter merged onto the base)."""
    from transformers import AutoModelForCausalLM

    from mocd_train.policies import is_policy_dir, load_policy

    if is_policy_dir(name):
        return load_policy(name, device, resolve_dtype(dtype, device), cache_dir)
    path = resolve_model(name, cache_dir)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device)).to(device).eval()
    return model, tokenizer
