"""Multi-objective token-level value model (CD-FUDGE, docs/algorithms.md §2) and the data it trains on.

V(x, y^t) ∈ R^G: a causal backbone and one linear head with G outputs at every position, so one forward pass
scores every prefix of a sequence, and with the KV cache a decoder pays only for the tokens it appends. Values are
in normalised units (the z-scores of the rollouts' rewards); the normaliser is saved with the model.

The backbone is any causal LM (π_ref, its first `num_layers` layers, or a smaller model) or the body of a
sequence-classification reward model whose score layer is replaced by the G-output head (as the RMOD paper does).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mocd_train.assets import resolve_model, split_of, unit_hash
from mocd_train.atomic import atomic_dir
from mocd_train.data import chat_texts
from mocd_train.errors import ConfigError
from mocd_train.models import float32_head, load_tokenizer
from mocd_train.rewards import Normalizer
from mocd_train.tensors import positions

VALUE_CONFIG = "value_config.json"
FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # where along a response the metrics (and the pairwise term) read the value


@dataclass
class BackboneSpec:
    """Where the backbone comes from; saved with the model so a frozen backbone is re-loaded, not copied."""

    name: str  # embedded name, hub id or path
    init_from: str = "causal_lm"  # causal_lm | reward_model
    num_layers: int | None = None  # keep only the first layers (None = all)
    train_mode: str = "full"  # full | lora | frozen


@dataclass
class ValueMeta:
    objectives: list[str]
    normalizer: dict
    backbone: dict
    prompt_format: str = "chat"  # chat | hh: how prompts and responses are laid out (see `value_text`)
    system_prompt: str | None = None
    shares_policy_tokenizer: bool = True
    extra: dict = field(default_factory=dict)


def check_objectives(expected: list[str], got: list[str], what: str, fix: str) -> None:
    if list(expected) != list(got):
        raise ConfigError(f"{what} has objectives {list(got)}, but this run's are {list(expected)}. {fix}")


def load_backbone(spec: BackboneSpec, dtype: torch.dtype = torch.float32, cache_dir: str | None = None):
    """(base model without any head, tokenizer) for a spec; truncation happens in the config, so the dropped layers'
    weights are never loaded."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification


    path = resolve_model(spec.name, cache_dir)
    config = AutoConfig.from_pretrained(path)
    if spec.num_layers is not None:
        total = config.num_hidden_layers
        if not 0 < spec.num_layers <= total:
            raise ConfigError(f"num_layers: {spec.num_layers} is not in 1..{total} (the layers of {spec.name}).")
        config.num_hidden_layers = spec.num_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[: spec.num_layers]
    if spec.init_from == "reward_model":
        rm = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
        backbone = getattr(rm, rm.base_model_prefix)
    elif spec.init_from == "causal_lm":
        backbone = AutoModel.from_pretrained(path, config=config, dtype=dtype)
    else:
        raise ConfigError(f"init_from: {spec.init_from!r} is not 'causal_lm' or 'reward_model'.")
    tokenizer = load_tokenizer(path, padding_side="left")
    return backbone, tokenizer


@dataclass
class ValueState:
    """The value model's KV cache of a batch of prefixes and the attention mask it was built with."""

    cache: object
    attention_mask: torch.Tensor  # [N, L]

    def select(self, index: torch.Tensor) -> "ValueState":
        """Keep rows `index` (e.g. each prompt's winning branch) — in place on the cache."""
        self.cache.batch_select_indices(index)
        return ValueState(self.cache, self.attention_mask[index])

    def repeat(self, k: int) -> "ValueState":
        """Each row k times, consecutively (row i → rows i·k … i·k+k−1) — in place on the cache."""
        self.cache.batch_repeat_interleave(k)
        return ValueState(self.cache, self.attention_mask.repeat_interleave(k, 0))


class ValueModel(nn.Module):
    def __init__(self, backbone: nn.Module, meta: ValueMeta):
        super().__init__()
        self.backbone = backbone
        self.meta = meta
        self.head = nn.Linear(backbone.config.hidden_size, len(meta.objectives))
        nn.init.zeros_(self.head.weight)  # start at the normalised mean (0) and let the data move it
        nn.init.zeros_(self.head.bias)

    @property
    def objectives(self) -> list[str]:
        return self.meta.objectives

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the backbone can read (GPT-2: 1,024), or None when it has no fixed limit."""
        config = self.backbone.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @property
    def normalizer(self) -> Normalizer:
        return Normalizer(**self.meta.normalizer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None,
                use_cache: bool = False):
        """Values [N, T, G] of the T new tokens. `attention_mask` covers the cached prefix and the new tokens."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions(attention_mask, input_ids.shape[1]),
                            past_key_values=past_key_values, use_cache=use_cache)
        hidden = out.last_hidden_state
        values = self.head(hidden.to(self.head.weight.dtype)).float()  # the head stays float32 (`float32_head`)
        return values, (out.past_key_values if use_cache else None)

    # ------------------------------------------------------------------------------------------ incremental API

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ValueState]:
        """Encode prefixes once; returns their values [N, L, G] and the state to extend."""
        values, cache = self(input_ids, attention_mask, use_cache=True)
        return values, ValueState(cache, attention_mask)

    @torch.no_grad()
    def extend(self, state: ValueState, new_ids: torch.Tensor, new_mask: torch.Tensor):
        """Append tokens [N, B] (mask 0 for tokens after a row's end); returns their values [N, B, G] and the
        extended state. Only the B new tokens are computed."""
        mask = torch.cat([state.attention_mask, new_mask.to(state.attention_mask)], 1)
        values, cache = self(new_ids, mask, past_key_values=state.cache, use_cache=True)
        return values, ValueState(cache, mask)

    @torch.no_grad()
    def score_blocks(self, state: ValueState, blocks: torch.Tensor, block_mask: torch.Tensor,
                     prev_values: torch.Tensor | None = None):
        """K candidate blocks of B tokens per prefix: blocks [N, K, B] → values at each block's last real token
        [N, K, G] and the state of the N·K extended prefixes (row n·K + k). `state` is consumed (its cache grows
        to N·K rows). A block with no real token (a finished row) gets `prev_values` [N, G] (default 0)."""
        n, k, b = blocks.shape
        state = state.repeat(k)
        values, state = self.extend(state, blocks.reshape(n * k, b), block_mask.reshape(n * k, b))
        return block_end_values(values, block_mask.reshape(n * k, b), prev_values, k).view(n, k, -1), state

    # --------------------------------------------------------------------------------------------- save / load

    def save(self, directory: str | Path, tokenizer) -> None:
        """value_config.json + its tokenizer + head + the backbone's trained part (all of it, a LoRA adapter, or
        nothing if frozen: the spec in value_config.json re-loads it). Written to a temp folder, then renamed."""
        from safetensors.torch import save_file  # heavy

        with atomic_dir(directory) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                      str(tmp / "head.safetensors"))
            mode = self.meta.backbone["train_mode"]
            if mode == "full":
                self.backbone.save_pretrained(tmp / "backbone")
            elif mode == "lora":
                self.backbone.save_pretrained(tmp / "adapter")
            tokenizer.save_pretrained(tmp / "tokenizer")
            (tmp / VALUE_CONFIG).write_text(json.dumps(asdict(self.meta), indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             objectives: list[str] | None = None, cache_dir: str | None = None) -> tuple["ValueModel", object]:
        """(value model in eval mode, its tokenizer). Passing `objectives` checks they match the model's."""
        from safetensors.torch import load_file
        from transformers import AutoModel


        directory = Path(directory)
        if not (directory / VALUE_CONFIG).is_file():
            raise ConfigError(f"{directory} is not a saved value model (no {VALUE_CONFIG}); train one with "
                              "recipes/train_value.py.")
        meta = ValueMeta(**json.loads((directory / VALUE_CONFIG).read_text()))
        if objectives is not None:
            check_objectives(objectives, meta.objectives, f"value model {directory}",
                             "Train a value model on rollouts with these objectives, or change `objectives`.")
        spec = BackboneSpec(**meta.backbone)
        if spec.train_mode == "full":
            backbone = AutoModel.from_pretrained(directory / "backbone", dtype=dtype)
        else:
            backbone, _ = load_backbone(spec, dtype, cache_dir)
            if spec.train_mode == "lora":
                from peft import PeftModel

                backbone = PeftModel.from_pretrained(backbone, directory / "adapter").merge_and_unload()
        tokenizer = load_tokenizer(str(directory / "tokenizer"))
        model = cls(backbone, meta)
        model.head.load_state_dict(load_file(str(directory / "head.safetensors")))
        model = model.to(device=device, dtype=dtype).eval()
        float32_head(model.head)
        return model, tokenizer


def block_end_values(values: torch.Tensor, mask: torch.Tensor, prev: torch.Tensor | None, k: int = 1):
    """values [M, B, G] at each row's last real token ([M, G]); rows without one take prev [M/k, G] (or 0)."""
    m, b, g = values.shape
    mask = mask.to(values.device).bool()
    has = mask.any(1)
    last = torch.where(has, b - 1 - mask.flip(1).long().argmax(1), torch.zeros_like(has, dtype=torch.long))
    out = values[torch.arange(m, device=values.device), last]
    fallback = torch.zeros_like(out) if prev is None else prev.repeat_interleave(k, 0).to(out)
    return torch.where(has[:, None], out, fallback)


# ------------------------------------------------------------------------------------------------ training data


def value_text(prompt_format: str, tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt as the value model reads it: the chat template if its tokenizer has one, else HH-style text
    (what GPT-2-family reward models were trained on)."""

    if prompt_format == "chat":
        return chat_texts(tokenizer, [prompt], system_prompt)[0]
    return f"\n\nHuman: {prompt}\n\nAssistant:"


def prompt_format_for(tokenizer) -> str:
    return "chat" if tokenizer.chat_template else "hh"


def value_input_ids(meta: ValueMeta, tokenizer, prompt: str, response_ids: list[int] | None = None,
                    response_text: str | None = None, finished: bool = False) -> tuple[list[int], int]:
    """The one rule for what the value model reads, in training and in decoding alike: the prompt as `value_text`
    lays it out, then the response (`value_response_ids`). Returns (ids, index where the response starts)."""
    (prompt_ids,) = value_prompt_ids(meta, tokenizer, [prompt])
    (response,) = value_response_ids(meta, tokenizer, None if response_ids is None else [response_ids],
                                     None if response_text is None else [response_text], [finished])
    return prompt_ids + response, len(prompt_ids)


def value_prompt_ids(meta: ValueMeta, tokenizer, prompts: list[str]) -> list[list[int]]:
    """The prompts as the value model reads them (`value_text`), tokenised in one call."""
    texts = [value_text(meta.prompt_format, tokenizer, p, meta.system_prompt) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def value_response_ids(meta: ValueMeta, tokenizer, response_ids: list[list[int]] | None = None,
                       response_texts: list[str] | None = None, finished: list[bool] | None = None):
    """The responses as the value model reads them: the policy's own token ids when the value model shares its
    tokenizer, else the text (stripped, as teacher datasets store it) tokenised on its own in one call; then EOS for
    the responses that finished."""
    if meta.shares_policy_tokenizer:
        out = [list(r) for r in response_ids]
    else:
        lead = " " if meta.prompt_format == "hh" else ""
        out = tokenizer([lead + t.strip() for t in response_texts], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and finished is not None:
        out = [r + [eos] if f else r for r, f in zip(out, finished)]
    return out


def value_example(tokenizer, meta: ValueMeta, row: dict, targets: list[float], max_length: int) -> dict | None:
    """One training sequence (`value_input_ids` of a rollout row, cut to max_length), the index where the response
    starts and the normalised reward vector."""
    ids, start = value_input_ids(meta, tokenizer, row["prompt"], row["response_ids"], row["response"], row["finished"])
    ids = ids[:max_length]
    if len(ids) <= start:  # the prompt alone fills max_length: nothing to learn from
        return None
    return {"input_ids": ids, "response_start": start, "targets": targets, "length": len(ids),
            "prompt_id": row["prompt_id"]}


def collate_values(batch: list[dict], pad_id: int, fractions=FRACTIONS) -> dict[str, torch.Tensor]:
    """Right-padded batch; `response_mask` marks the positions whose prefix holds ≥ 1 response token, `positions`
    [N, F] the position at each fraction of the response (`fraction_positions`), `groups` [N] a prompt index within
    the batch (for the within-prompt pairwise term)."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    resp = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        attn[i, :n] = 1
        resp[i, ex["response_start"]:n] = True
    targets = torch.tensor([ex["targets"] for ex in batch], dtype=torch.float32)
    index: dict[str, int] = {}
    groups = torch.tensor([index.setdefault(ex["prompt_id"], len(index)) for ex in batch], dtype=torch.long)
    positions = torch.tensor([fraction_positions(ex, fractions) for ex in batch], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "targets": targets, "groups": groups,
            "positions": positions}


def fraction_positions(example: dict, fractions=FRACTIONS) -> list[int]:
    """The position of token ⌈f·L⌉ of an example's L response tokens, for each fraction f."""
    n = len(example["input_ids"]) - example["response_start"]
    return [example["response_start"] + max(math.ceil(f * n), 1) - 1 for f in fractions]


def value_loss(values: torch.Tensor, targets: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """docs/algorithms.md §2 (RMOD §5.1): squared error to the final reward at every response prefix, averaged over a
    sequence's response positions, then over sequences and objectives."""
    err = ((values - targets[:, None, :]) ** 2).mean(-1)  # [N, T]
    mask = response_mask.to(err.dtype)
    per_seq = (err * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_seq.mean()


def pairwise_loss(values: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, positions: torch.Tensor,
                  margin: float) -> torch.Tensor:
    """The within-prompt ranking term (docs/algorithms.md §2): for each pair of responses to one prompt whose final
    normalised rewards differ by ≥ margin on an objective, the logistic (Bradley–Terry) loss of their values' order at
    each of `positions`' fractions, log(1 + exp(−sign(r_i − r_j)(V_i − V_j))); mean over such pairs (0 if none).
    What a decoder needs is this order among one prompt's branches, which the regression learns only indirectly."""
    picked = values.gather(1, positions[:, :, None].expand(-1, -1, values.shape[-1]))  # [N, F, G]
    same = (groups[:, None] == groups[None, :]).triu(1)  # pairs i < j of one prompt
    diff = targets[:, None, :] - targets[None, :, :]  # [N, N, G]
    use = same[:, :, None] & (diff.abs() >= margin)
    if not bool(use.any()):
        return values.sum() * 0.0
    gap = picked[:, None] - picked[None, :]  # [N, N, F, G]
    loss = torch.nn.functional.softplus(-diff.sign()[:, :, None, :] * gap)
    return loss[use[:, :, None, :].expand_as(loss)].mean()


@torch.no_grad()
def prefix_values(model: ValueModel, examples: list[dict], pad_id: int, batch_size: int = 16,
                  fractions=FRACTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Values at the given fractions of each response (position ⌈f·L⌉ of its L response tokens): [N, F, G], and the
    targets [N, G]."""
    device = model.head.weight.device
    out, targets = [], []
    for i in range(0, len(examples), batch_size):
        batch = collate_values(examples[i : i + batch_size], pad_id)
        values, _ = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        for j, ex in enumerate(examples[i : i + batch_size]):
            out.append(values[j, fraction_positions(ex, fractions)].cpu())
        targets.append(batch["targets"])
    return torch.stack(out), torch.cat(targets)


def pair_accuracy(values, targets, by_prompt: dict[str, list[int]], margin: float = 0.5) -> dict:
    """Within-prompt pairwise accuracy: over pairs of one prompt's responses whose final rewards differ by ≥ margin,
    the share the value orders the same way (ties count half), with its standard error clustered by prompt (pairs
    of one prompt are not independent) and the numbers of pairs and of prompts that have one."""
    import numpy as np

    hits, counts = [], []
    for idx in by_prompt.values():
        v, t = values[idx], targets[idx]
        dt, dv = t[:, None] - t[None, :], v[:, None] - v[None, :]
        pairs = np.triu(np.abs(dt) >= margin, 1)
        if pairs.any():
            agree = np.sign(dt[pairs]) * np.sign(dv[pairs])
            hits.append(float(((agree > 0) + 0.5 * (agree == 0)).sum()))
            counts.append(int(pairs.sum()))
    if not counts:
        return {"accuracy": float("nan"), "se": float("nan"), "pairs": 0, "prompts": 0}
    h, c = np.array(hits), np.array(counts, dtype=float)
    acc = h.sum() / c.sum()
    x = len(c)
    se = float(np.sqrt(x / max(x - 1, 1) * ((h - acc * c) ** 2).sum()) / c.sum()) if x > 1 else float("nan")
    return {"accuracy": float(acc), "se": se, "pairs": int(c.sum()), "prompts": x}


def value_metrics(values: torch.Tensor, targets: torch.Tensor, objectives: list[str], groups: list[str],
                  fractions=FRACTIONS, pair_margin: float = 0.5) -> dict:
    """Per objective and response fraction: MSE, Pearson and Spearman of the value vs the final (normalised) reward,
    the mean within-prompt Spearman (`groups` = prompt ids) and the within-prompt pairwise accuracy on pairs whose
    final rewards differ by ≥ pair_margin (`pair_accuracy`) — what a decoder choosing among one prompt's branches
    relies on."""
    import numpy as np

    metrics: dict[str, dict] = {}
    by_prompt: dict[str, list[int]] = {}
    for i, gid in enumerate(groups):
        by_prompt.setdefault(gid, []).append(i)
    multi = [idx for idx in by_prompt.values() if len(idx) > 2]
    for g, name in enumerate(objectives):
        per = {}
        for f_i, f in enumerate(fractions):
            v, t = values[:, f_i, g].double().numpy(), targets[:, g].double().numpy()
            within = [_corr(v[idx], t[idx], "spearman") for idx in multi]
            within = [w for w in within if not np.isnan(w)]
            per[f"{round(f * 100)}%"] = {
                "mse": float(((v - t) ** 2).mean()),
                "pearson": _corr(v, t, "pearson"),
                "spearman": _corr(v, t, "spearman"),
                "within_prompt_spearman": float(np.mean(within)) if within else float("nan"),
                "within_prompt_pair_accuracy": pair_accuracy(v, t, by_prompt, pair_margin),
            }
        metrics[name] = per
    metrics["num_sequences"] = len(targets)
    metrics["num_prompts"] = len(by_prompt)
    metrics["pair_margin"] = pair_margin
    return metrics


def selection_score(metrics: dict, objectives: list[str], at: str = "25%") -> float:
    """What checkpoint selection maximises: the mean over objectives of the within-prompt pairwise accuracy at 25 % of
    the response (objectives without a qualifying pair are left out)."""
    accs = [metrics[g][at]["within_prompt_pair_accuracy"]["accuracy"] for g in objectives]
    accs = [a for a in accs if not math.isnan(a)]
    return sum(accs) / len(accs) if accs else float("nan")


def _corr(v, t, kind: str) -> float:
    from scipy.stats import pearsonr, spearmanr

    if v.std() < 1e-12 or t.std() < 1e-12:
        return float("nan")
    return float((pearsonr if kind == "pearson" else spearmanr)(v, t)[0])


# ----------------------------------------------------------------------------------------------------- trainer


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def build_value_model(spec: BackboneSpec, objectives: list[str], normalizer: Normalizer, policy_tokenizer,
                      system_prompt: str | None, lora: dict | None = None, cache_dir: str | None = None):
    """A fresh value model (head at zero) and the tokenizer it reads with. When its vocabulary is the policy's, it
    reads the policy's own token ids and chat formatting; otherwise decoders re-tokenise the text for it."""
    backbone, tokenizer = load_backbone(spec, torch.float32, cache_dir)
    shares = same_tokenizer(policy_tokenizer, tokenizer)
    if shares:
        tokenizer = policy_tokenizer
    meta = ValueMeta(objectives=list(objectives), normalizer=asdict(normalizer), backbone=asdict(spec),
                     prompt_format="chat" if shares else prompt_format_for(tokenizer), system_prompt=system_prompt,
                     shares_policy_tokenizer=shares)
    model = ValueModel(backbone, meta)
    if spec.train_mode == "frozen":
        model.backbone.requires_grad_(False)
    elif spec.train_mode == "lora":
        from peft import LoraConfig, get_peft_model

        model.backbone = get_peft_model(model.backbone, LoraConfig(**(lora or {})))
    return model, tokenizer


class PromptGroupSampler(torch.utils.data.Sampler):
    """Indices grouped by prompt, each prompt's responses together and padded to the largest group by repeating its
    members, prompts in a fresh seeded order each epoch: with a batch size that is a multiple of the group size,
    every batch holds whole prompts, which the within-prompt pairwise term needs."""

    def __init__(self, prompt_ids: list[str], seed: int):
        groups: dict[str, list[int]] = {}
        for i, pid in enumerate(prompt_ids):
            groups.setdefault(pid, []).append(i)
        self.groups = list(groups.values())
        self.size = max(len(g) for g in self.groups)
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.groups) * self.size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        self.epoch += 1
        for g in torch.randperm(len(self.groups), generator=gen).tolist():
            members = self.groups[g]
            yield from (members * self.size)[: self.size]


def value_trainer_class():
    """transformers' Trainer with the value loss (the masked multi-prefix MSE, plus the within-prompt pairwise term
    when `pairwise_weight` > 0, on prompt-grouped batches) and, when `selection` examples are given, an evaluation that
    scores checkpoints by `selection_score` for `load_best_model_at_end` (built late: importing Trainer is slow)."""
    from transformers import Trainer

    class ValueTrainer(Trainer):
        def __init__(self, *args, pairwise_weight: float = 0.0, pair_margin: float = 0.5,
                     selection: list[dict] | None = None, objectives: list[str] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.pairwise_weight, self.pair_margin = pairwise_weight, pair_margin
            self.selection, self.objectives = selection, objectives

        def _get_train_sampler(self, train_dataset=None):
            if self.pairwise_weight > 0:
                return PromptGroupSampler((train_dataset or self.train_dataset)["prompt_id"], self.args.seed)
            return super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            values, _ = model(inputs["input_ids"], inputs["attention_mask"])
            loss = value_loss(values, inputs["targets"], inputs["response_mask"])
            if self.pairwise_weight > 0:
                loss = loss + self.pairwise_weight * pairwise_loss(values, inputs["targets"], inputs["groups"],
                                                                   inputs["positions"], self.pair_margin)
            return (loss, values) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
            if self.selection is None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            values, targets = prefix_values(model, self.selection, self.data_collator.keywords["pad_id"],
                                            self.args.per_device_eval_batch_size)
            model.train(was_training)
            metrics = value_metrics(values, targets, self.objectives, [ex["prompt_id"] for ex in self.selection],
                                    pair_margin=self.pair_margin)
            out = {f"{metric_key_prefix}_pair_accuracy": selection_score(metrics, self.objectives)}
            for g in self.objectives:
                out[f"{metric_key_prefix}_{g}_pair_accuracy_25"] = metrics[g]["25%"]["within_prompt_pair_accuracy"][
                    "accuracy"]
            self.log(out)
            return out

    return ValueTrainer


def value_datasets(rollouts, tokenizer, meta: ValueMeta, normalizer: Normalizer, max_length: int,
                   heldout_fraction: float, validation_fraction: float = 0.0, train_prompts: int | None = None,
                   samples_per_prompt: int | None = None, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Rollouts → (train, validation, held-out) sequences; every response of a prompt lands on one side. The held-out
    side (reported metrics) depends only on the prompt texts and `heldout_fraction`; validation (checkpoint
    selection) is carved from the rest with another hash. `train_prompts` / `samples_per_prompt` keep a seeded subset
    of the training side only — data ablations are then measured on the same held-out prompts."""

    raw = torch.tensor([[row[f"reward_{name}"] for name in meta.objectives] for row in rollouts], dtype=torch.float64)
    targets = normalizer(raw).tolist()
    sides: dict[str, list[dict]] = {"train": [], "validation": [], "heldout": []}
    for row, target in zip(rollouts, targets):
        ex = value_example(tokenizer, meta, row, target, max_length)
        if ex is None:
            continue
        if split_of(row["prompt"], heldout_fraction, salt="value-split:") == "heldout":
            side = "heldout"
        elif validation_fraction and split_of(row["prompt"], validation_fraction,
                                              salt="value-validation:") == "heldout":
            side = "validation"
        else:
            side = "train"
        ex["sample"] = row.get("sample", 0)
        sides[side].append(ex)
    train = sides["train"]
    if samples_per_prompt is not None:
        train = [ex for ex in train if ex["sample"] < samples_per_prompt]
    if train_prompts is not None:
        keep = sorted({ex["prompt_id"] for ex in train}, key=lambda p: unit_hash(str(p), f"value-subset:{seed}:"))
        keep = set(keep[:train_prompts])
        train = [ex for ex in train if ex["prompt_id"] in keep]
    if not train or not sides["heldout"] or (validation_fraction and not sides["validation"]):
        raise ConfigError(f"heldout_fraction {heldout_fraction} / validation_fraction {validation_fraction} leave "
                          f"{len(train)} training, {len(sides['validation'])} validation and {len(sides['heldout'])} "
                          "held-out sequences; roll out more prompts or change the fractions.")
    return train, sides["validation"], sides["heldout"]
