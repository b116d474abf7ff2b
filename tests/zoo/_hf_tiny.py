"""Tiny random-init Hugging Face models shared by the round-trip tests (offline).

Each factory returns ``(model in eval mode, example inputs, AutoModel class name)``."""
from __future__ import annotations

import torch
import transformers

B, N, V = 2, 8, 64
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=32)


def ids(b=B, n=N, seed=0):
    return torch.randint(3, V, (b, n), generator=torch.Generator().manual_seed(seed))


def llama():
    cfg = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval(), (ids(),), "AutoModelForCausalLM"


def qwen2():
    cfg = transformers.Qwen2Config(**SMALL, num_key_value_heads=2, use_cache=False)
    return transformers.Qwen2ForCausalLM(cfg).eval(), (ids(),), "AutoModelForCausalLM"


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  n_inner=48, use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), (ids(),), "AutoModelForCausalLM"


def bert():
    cfg = transformers.BertConfig(**SMALL, type_vocab_size=2)
    return (transformers.BertForMaskedLM(cfg).eval(), (ids(), torch.ones(B, N, dtype=torch.long)),
            "AutoModelForMaskedLM")
