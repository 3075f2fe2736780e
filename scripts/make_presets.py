#!/usr/bin/env python3
"""Writes the model presets under models/ (config, synthetic word-level tokenizer, chat template).

The tokenizers are word-level: word `wN` is id N, split on whitespace, so "w17 w4 w99" is exactly
three tokens. Special tokens follow Llama 3.1 (`<|begin_of_text|>`, `<|eot_id|>`, ...). Unknown
words map to `w0` (these presets serve dummy weights: only token counts matter).

Usage: python3 scripts/make_presets.py   (stdlib only; rerun after editing, commit the outputs)
"""

import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama31_specials(first_id, count):
    """Llama 3.1's special tokens from `first_id` on (256 of them in the real tokenizer)."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        4: "<|finetune_right_pad_id|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    out, reserved = [], 0
    for i in range(count):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return {first_id + i: tok for i, tok in enumerate(out)}


def tiny_specials(first_id):
    toks = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|reserved_special_token_2|>"]
    return {first_id + i: tok for i, tok in enumerate(toks)}


def tokenizer_json(num_words, specials):
    bos = "<|begin_of_text|>"
    bos_id = next(i for i, t in specials.items() if t == bos)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in sorted(specials.items())
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"w{i}": i for i in range(num_words)},
                  "unk_token": "w0"},
    }


def tokenizer_config(specials, max_len):
    return {
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in sorted(specials.items())
        },
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


FP8_DYNAMIC = {
    "config_groups": {
        "group_0": {
            "input_activations": {
                "actorder": None, "block_structure": None, "dynamic": True, "group_size": None,
                "num_bits": 8, "observer": None, "observer_kwargs": {}, "strategy": "token",
                "symmetric": True, "type": "float",
            },
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
                "num_bits": 8, "observer": "minmax", "observer_kwargs": {}, "strategy": "channel",
                "symmetric": True, "type": "float",
            },
        }
    },
    "format": "float-quantized",
    "global_compression_ratio": 1.4633,
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


def llama_config(hidden, inter, layers, heads, kv_heads, vocab, bos, eos, rope_orig, fp8):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 131072 if rope_orig == 8192 else 4096,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": rope_orig,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.47.0",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if fp8:
        cfg["quantization_config"] = FP8_DYNAMIC
    return cfg


def write(dir_name, files):
    d = os.path.join(ROOT, dir_name)
    os.makedirs(d, exist_ok=True)
    for name, obj in files.items():
        with open(os.path.join(d, name), "w") as f:
            if name == "tokenizer.json":
                json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
            else:
                json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")


def preset(num_words, specials, config, eos_ids):
    assert len(specials) + num_words == config["vocab_size"]
    return {
        "config.json": config,
        "generation_config.json": {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": eos_ids,
            "transformers_version": "4.47.0",
        },
        "tokenizer.json": tokenizer_json(num_words, specials),
        "tokenizer_config.json": tokenizer_config(specials, config["max_position_embeddings"]),
    }


def main():
    # Mirrors neuralmagic/DeepSeek-R1-Distill-Llama-70B-FP8-dynamic's config.json.
    big = llama31_specials(128000, 256)
    cfg = llama_config(8192, 28672, 80, 64, 8, 128256, 128000, 128001, 8192, fp8=True)
    write("llama-3.3-70b-fp8-dynamic", preset(128000, big, cfg, [128001, 128008, 128009]))
    # Tiny models for tests and demos (dummy weights), BF16 and FP8.
    small = tiny_specials(512)
    for name, fp8 in [("tiny-llama", False), ("tiny-llama-fp8", True)]:
        cfg = llama_config(64, 128, 2, 4, 2, 520, 512, 513, 256, fp8=fp8)
        write(name, preset(512, small, cfg, [513, 516]))


if __name__ == "__main__":
    main()
