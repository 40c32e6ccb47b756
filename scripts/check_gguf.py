"""CI: ember's GGUF files read back by the Python `gguf` package (PyPI), the reader of
llama.cpp's own tools. Checks the tiny fixture's export (f32, q8_0) and LoRA adapter export.

    python scripts/check_gguf.py <folder with tiny-f32.gguf, tiny-q8_0.gguf, lora.gguf> <tiny_llama folder>
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
        tensors = {t.name: t for t in reader.tensors}
        for name, key in by_gguf.items():
            t = tensors[name]
            values = dequantize(t.data, t.tensor_type).reshape(weights[key].shape)
            scale = np.abs(weights[key]).max()
            worst = np.abs(values - weights[key]).max()
            assert worst <= tolerance * scale, (ty, name, worst, scale)
        tokens = reader.fields["tokenizer.ggml.tokens"]
        assert len(tokens.data) == 1000, len(tokens.data)
        print(f"gguf {ty}: {len(reader.tensors)} tensors, {len(tokens.data)} tokens, values ok")
    lora = GGUFReader(f"{out}/lora.gguf")
    assert field(lora, "general.type") == "adapter" and field(lora, "adapter.type") == "lora"
    assert float(field(lora, "adapter.lora.alpha")) == 16.0
    names = sorted(t.name for t in lora.tensors)
    assert len(names) == 16 and names[0] == "blk.0.attn_k.weight.lora_a", names
    print(f"gguf lora: {len(names)} tensors, alpha 16, ok")


if __name__ == "__main__":
    main()
