"""CI: ember's GGUF files read back by the Python `gguf` package (PyPI), the reader of
llama.cpp's own tools. Checks the tiny fixture's export (f32, q8_0), the LoRA adapter export,
and a Q4_K_M export of a 256-wide model (`wide/`, its f32 folder).

    python scripts/check_gguf.py <folder with tiny-f32.gguf, tiny-q8_0.gguf, lora.gguf, wide/, wide-q4_k_m.gguf> <tiny_llama folder>
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def safetensors_f32(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], np.float32).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}


def field(reader, key):
    part = reader.fields[key].parts[-1]
    return bytes(part).decode() if part.dtype == np.uint8 else part[0]


def assert_within(reader, weights, by_gguf, tolerance):
    """gguf-py's dequantization of each GGUF tensor in `by_gguf` within `tolerance(type name)` x
    the largest magnitude of its HF tensor in `weights` (a block's step is at most that)."""
    tensors = {t.name: t for t in reader.tensors}
    for name, key in by_gguf.items():
        t = tensors[name]
        values = dequantize(t.data, t.tensor_type).reshape(weights[key].shape)
        scale = np.abs(weights[key]).max()
        worst = np.abs(values - weights[key]).max()
        assert worst <= tolerance(t.tensor_type.name) * scale, (name, t.tensor_type.name, worst, scale)


def main():
    out, tiny = sys.argv[1], sys.argv[2]
    weights = safetensors_f32(f"{tiny}/model.safetensors")
    by_gguf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
               "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
               "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
               "output_norm.weight": "model.norm.weight"}
    for ty, tolerance in (("f32", 0.0), ("q8_0", 1 / 127)):
        reader = GGUFReader(f"{out}/tiny-{ty}.gguf")
        assert field(reader, "general.architecture") == "llama"
        assert len(reader.tensors) == len(weights), (len(reader.tensors), len(weights))
        assert_within(reader, weights, by_gguf, lambda _: tolerance)
        tokens = reader.fields["tokenizer.ggml.tokens"]
        assert len(tokens.data) == 1000, len(tokens.data)
        print(f"gguf {ty}: {len(reader.tensors)} tensors, {len(tokens.data)} tokens, values ok")
    lora = GGUFReader(f"{out}/lora.gguf")
    assert field(lora, "general.type") == "adapter" and field(lora, "adapter.type") == "lora"
    assert float(field(lora, "adapter.lora.alpha")) == 16.0
    names = sorted(t.name for t in lora.tensors)
    assert len(names) == 16 and names[0] == "blk.0.attn_k.weight.lora_a", names
    print(f"gguf lora: {len(names)} tensors, alpha 16, ok")

    # Q4_K_M: llama-quantize's types, and gguf-py's dequantization within each type's step.
    wide = safetensors_f32(f"{out}/wide/model.safetensors")
    reader = GGUFReader(f"{out}/wide-q4_k_m.gguf")
    assert int(field(reader, "general.file_type")) == 15
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K",
                "token_embd.weight": "Q4_K", "output.weight": "Q6_K", "output_norm.weight": "F32"}
    assert all(kinds[n] == k for n, k in expected.items()), kinds
    by_gguf = {"blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight", "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
               "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight", "output.weight": "lm_head.weight"}
    assert_within(reader, wide, by_gguf, lambda kind: 0.12 if kind == "Q4_K" else 0.03)
    print(f"gguf q4_k_m: {dict(sorted((k, list(kinds.values()).count(k)) for k in set(kinds.values())))}, values ok")


if __name__ == "__main__":
    main()
