"""The onnxruntime-genai folder: `genai_config.json` beside `model.onnx` and the HF tokenizer files.

Stock onnxruntime-genai (PyPI) runs the export unchanged: it finds the key/value layers and the
conv/recurrent layers by their input names, reads each layer's head count and width from the
graph, sizes every key/value buffer to `max_length` and binds past and present to one buffer
(`past_present_share_buffer`). HAM layers therefore have capacity `max_length` under genai: the
cache never fills, and memory is bounded by `max_length`, not by the admitted fraction.

Batches of prompts of different lengths: genai's `Tokenizer.encode_batch` pads them on the right
with `pad_token_id`, and genai 0.18 feeds `attention_mask` `[batch, total length]` (0 for the
`pad_token_id` tokens after a row's last other token, 1 before, then 1 per generated token) and
`position_ids` (counted over the tokens marked 1), and reads each row's logits at that last token.
The graph keeps pads out of every state and cache, so each row generates what its prompt alone
generates. genai takes right padding only (a left pad is marked 1); left padding goes through
`ham_mlx.export.runtime`. (A prompt ending in `pad_token_id` loses that token to genai.)
"""

from __future__ import annotations

import json
from pathlib import Path

from ham_mlx.config import ModelArgs

from .cache_io import LayerIO

CONFIG_FILE = "genai_config.json"


def genai_config(
    args: ModelArgs, ios: list[LayerIO], context_length: int, filename: str = "model.onnx"
) -> dict:
    kv = [io for io in ios if io.key is not None]
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    outputs = {"logits": "logits"}
    if any(io.kind == "attn" for io in ios):
        inputs["position_ids"] = "position_ids"
    if kv:
        inputs["past_key_names"] = "past_key_values.%d.key"
        inputs["past_value_names"] = "past_key_values.%d.value"
        outputs["present_key_names"] = "present.%d.key"
        outputs["present_value_names"] = "present.%d.value"
    if any(io.conv is not None for io in ios):
        inputs["past_conv_names"] = "past_key_values.%d.conv_state"
        inputs["past_recurrent_names"] = "past_key_values.%d.recurrent_state"
        outputs["present_conv_names"] = "present.%d.conv_state"
        outputs["present_recurrent_names"] = "present.%d.recurrent_state"
    heads, width = kv[0].key if kv else (args.num_heads, args.head_dim)
    return {
        "model": {
            "bos_token_id": args.bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": width,  # per-layer shapes are read from the graph
                "hidden_size": args.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": args.num_heads,
                "num_hidden_layers": args.num_hidden_layers,
                "num_key_value_heads": heads,
            },
            "eos_token_id": args.eos_token_id,
            "pad_token_id": args.pad_token_id
            if args.pad_token_id is not None
            else args.eos_token_id,
            "type": "decoder",
            "vocab_size": args.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def write_genai_config(
    out_dir: str | Path, args: ModelArgs, ios: list[LayerIO], context_length: int
) -> Path:
    path = Path(out_dir) / CONFIG_FILE
    path.write_text(json.dumps(genai_config(args, ios, context_length), indent=2) + "\n")
    return path
