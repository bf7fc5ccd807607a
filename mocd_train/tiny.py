"""Tiny random models and a byte-level BPE tokenizer, built locally (tests and `--quick` benches; no hub)."""

from __future__ import annotations

from pathlib import Path

from mocd_train.assets import Prompt
from mocd_train.config import RolloutsConfig, to_dict
from mocd_train.data import merge_rollouts
from mocd_train.models import load_tokenizer
from mocd_train.rundir import atomic_write_json, mark_complete, stage_dir

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then let it rise.",
    "What is the capital of France? The capital of France is Paris.",
    "I'm sorry, but I can't help with that request.",
    "Tell me a joke about cats. Cats are great, and they love to sleep all day.",
    "The quick brown fox jumps over the lazy dog. Python is a programming language.",
]


def tiny_tokenizer(vocab_size: int = 384, chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def _save_lm(model, tokenizer, path: str | Path) -> Path:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def tiny_llama(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, vocab_size: int = 384) -> Path:
    """A 2-layer Llama with a ChatML tokenizer saved to `path` (loadable by name like any checkpoint)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    return _save_lm(model, tokenizer, path)


def tiny_gpt2_lm(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 causal LM with the ChatML tokenizer (a second architecture for the decoding engine)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    return _save_lm(model, tokenizer, path)


def tiny_gemma2(path: str | Path, seed: int = 0, sliding_window: int = 8, vocab_size: int = 384) -> Path:
    """A 2-layer Gemma-2 (one sliding-window layer, logit soft-capping) with the ChatML tokenizer."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = tiny_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=sliding_window,
                          max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Gemma2ForCausalLM(config)
    return _save_lm(model, tokenizer, path)


def tiny_gpt2_reward_model(path: str | Path, num_labels: int = 2, seed: int = 0, vocab_size: int = 384) -> Path:
    """A GPT-2 sequence classifier with `num_labels` heads and no pad token (as GPT-2 RMs ship)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = tiny_tokenizer(vocab_size, chat_template=False)
    tokenizer.pad_token = None
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        num_labels=num_labels, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.bos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def synthetic_rollouts(run_dir: str | Path, model: str, objectives: tuple[str, ...] = ("readability", "positivity"),
                       num_prompts: int = 64, num_samples: int = 4, max_len: int = 24, seed: int = 0) -> Path:
    """A complete rollouts stage for `model` (a tiny checkpoint's path) whose rewards are known functions of the
    response tokens: objective g is the share of tokens with id ≡ g (mod G + 1). Random responses over 32 token ids,
    random lengths. Lets the value model and decoders be tested against a ground truth without generation."""
    import random

    import yaml


    rng = random.Random(seed)
    tokenizer = load_tokenizer(model)
    specials = set(tokenizer.all_special_ids)
    # few ids: learnable from little data
    pool = rng.sample([i for i in range(len(tokenizer)) if i not in specials], 32)
    out = stage_dir(run_dir, "rollouts")
    rows = []
    for p in range(num_prompts):
        prompt = " ".join(rng.choice(_CORPUS).split()[: rng.randint(3, 8)]) + f" #{p}"
        for k in range(num_samples):
            ids = [rng.choice(pool) for _ in range(rng.randint(2, max_len))]
            row = {"prompt_id": f"p{p}", "prompt": prompt, "source": "synthetic", "category": "", "harmful": False,
                   "sample": k, "response": tokenizer.decode(ids), "response_ids": ids, "num_prompt_tokens": 0,
                   "num_response_tokens": len(ids), "finished": rng.random() < 0.5}
            row.update({f"reward_{name}": token_reward(ids, g, len(objectives)) for g, name in enumerate(objectives)})
            rows.append(row)
    atomic_write_json(out / "shards" / "chunk-00000.json", {"chunk": 0, "rank": 0, "world_size": 1, "gen_seconds": 1.0,
                                                           "score_seconds": 0.0, "new_tokens": 0, "rows": rows})
    cfg = RolloutsConfig(run_dir=str(run_dir), model=model, objectives=list(objectives), report_to="none")
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    prompts = [Prompt(f"p{p}", "synthetic") for p in range(num_prompts)]  # merge counts them: one chunk
    mark_complete(out, merge_rollouts(prompts, out / "shards", out, list(objectives), chunk_size=num_prompts,
                                      normalization="zscore"))
    return out


def token_reward(ids: list[int], g: int, num_objectives: int) -> float:
    """The synthetic objective g of `synthetic_rollouts`."""
    return sum(1 for i in ids if i % (num_objectives + 1) == g) / max(len(ids), 1)
