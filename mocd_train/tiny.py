"""Tiny random models and a byte-level BPE tokenizer, built locally (tests and `--quick` benches; no hub)."""

from __future__ import annotations

from pathlib import Path

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
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def tiny_gpt2_reward_model(path: str | Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A GPT-2 sequence classifier with `num_labels` heads and no pad token (as GPT-2 RMs ship)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = tiny_tokenizer(chat_template=False)
    tokenizer.pad_token = None
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        num_labels=num_labels, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.bos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
