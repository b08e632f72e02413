"""Tiny random decoders (GPT-2, Llama with grouped-query attention, Qwen2 with a tied head)
and the torch reference of their greedy tokens: shared by the export tests
(tests/exporter/test_decoder_export.py) and the runtime generation tests
(tests/runtime/test_generate.py)."""

from __future__ import annotations

import torch
import transformers

VOCAB, HIDDEN, LAYERS = 128, 64, 2
NEW_TOKENS = 64


def tiny_decoder(arch: str, seed: int = 0):
    """A 2-layer decoder, hidden 64, vocab 128, eager attention, weights ~ N(0, 0.3)."""
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 128,
              "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256,
            bos_token_id=1, eos_token_id=2))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, tie_word_embeddings=False))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, tie_word_embeddings=True))
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def torch_greedy(model, ids, mask=None, new_tokens=NEW_TOKENS):
    """``generate`` of the torch model: greedy, with its cache, exactly NEW_TOKENS tokens."""
    from edgestack.compress import decoded_weights

    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad(), decoded_weights(model):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()
