"""Hugging Face sequence-classification reward models (hub id or local path), one head per objective."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from mocd_train.assets import hub_available
from mocd_train.models import float32_head, resolve_dtype
from mocd_train.rewards.base import register


@register("hf_reward_model", "AutoModelForSequenceClassification logit `head` of a hub id or local checkpoint")
class HFRewardModel:
    """Scores `format(prompt, response)` with one output logit of a classifier.

    input_format: 'chat' applies the RM tokenizer's chat template (falls back to 'hh' without one);
    'hh' writes "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}" as HH-RLHF reward models expect;
    'plain' joins prompt and response with a blank line.
    """

    def __init__(self, name: str, model: str, device="cpu", head: int = 0,
                 input_format: Literal["chat", "hh", "plain"] = "chat", batch_size: int = 16, max_length: int = 1024,
                 dtype: str = "auto"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.head, self.batch_size, self.max_length = name, head, batch_size, max_length
        if not Path(model).expanduser().exists():
            hub_available(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        torch_dtype = resolve_dtype(dtype, torch.device(device))
        self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch_dtype).to(device).eval()
        for layer in ("score", "classifier"):  # the scoring layer in float32: a bf16 one makes near scores tie
            if isinstance(getattr(self.model, layer, None), torch.nn.Module):
                float32_head(getattr(self.model, layer))
        if self.tokenizer.pad_token is None:  # GPT-2 style RMs ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        num_labels = self.model.config.num_labels
        if not 0 <= head < num_labels:
            raise ValueError(f"objective {name!r}: head {head} is out of range; {model} has {num_labels} output(s).")
        if input_format == "chat" and not self.tokenizer.chat_template:
            input_format = "hh"
        self.input_format = input_format

    def format(self, prompt: str, response: str) -> str:
        if self.input_format == "chat":
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if self.input_format == "hh":
            return f"\n\nHuman: {prompt}\n\nAssistant: {response}"
        return f"{prompt}\n\n{response}"

    @torch.no_grad()
    def __call__(self, prompts, responses):
        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.model.device)
            out.append(self.model(**enc).logits[:, self.head].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
