"""Write a tiny random Llama checkpoint plus tokenizer, fully offline.

Usage (inside .venv-vllm): python infra/vllm/make_tiny_model.py [OUT_DIR]
The model's vocab equals the tokenizer's (a byte-level BPE trained on a few
lines), so every generated id decodes; the output is random-weight gibberish.
"""
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/vllm-work/tiny"
os.makedirs(out, exist_ok=True)

text = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny tokenizer for testing vLLM on CPU.",
    "npuflow quantizes and benchmarks models; vLLM serves them over HTTP.",
    "user assistant system: answer briefly and politely.",
] * 50
tok = Tokenizer(models.BPE(unk_token=None))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(
    text,
    trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
)
chat_template = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    chat_template=chat_template, model_max_length=2048,
)
fast.save_pretrained(out)

torch.manual_seed(0)
cfg = LlamaConfig(
    hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=512, vocab_size=len(fast), max_position_embeddings=2048,
    bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
print(out)
