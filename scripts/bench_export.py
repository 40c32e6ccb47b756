"""GGUF export speed, ember against llama.cpp's quantizer, side by side (issue 16).

For each type: `ember export gguf --type <t>` from the HF folder (safetensors -> merged ->
quantized GGUF), against `llama_model_quantize` (llama-quantize's library call, all cores) from
ember's f32 GGUF of the same folder. Both files are compared tensor by tensor. Without --model, a
one-layer LLaMA of Llama-2-7B's widths (hidden 4096, MLP 11008, vocabulary 32000; 464M
parameters, 1.9 GB in f32) is drawn with numpy's seeded normal and LLaMA-2's tokenizer.model.

    python scripts/bench_export.py --ember target/release/ember --work target/bench-export \\
        --gguf-py <llama.cpp>/gguf-py [--model <HF folder>] [--tokenizer <tokenizer.model>] [--imatrix]

Needs the llama_cpp package (scripts/verify-llamacpp.sh builds it), numpy and safetensors.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def seven_b_layer(folder, tokenizer):
    """One decoder layer at Llama-2-7B's widths, seeded."""
    from safetensors.numpy import save_file
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return
    os.makedirs(folder, exist_ok=True)
    hidden, inter, vocab = 4096, 11008, 32000
    rng = np.random.default_rng(0)
    draw = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02
    tensors = {"model.embed_tokens.weight": draw(vocab, hidden), "lm_head.weight": draw(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float32),
               "model.layers.0.input_layernorm.weight": np.ones(hidden, np.float32),
               "model.layers.0.post_attention_layernorm.weight": np.ones(hidden, np.float32),
               "model.layers.0.mlp.gate_proj.weight": draw(inter, hidden), "model.layers.0.mlp.up_proj.weight": draw(inter, hidden),
               "model.layers.0.mlp.down_proj.weight": draw(hidden, inter)}
    for p in "qkvo":
        tensors[f"model.layers.0.self_attn.{p}_proj.weight"] = draw(hidden, hidden)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float32"}
    json.dump(config, open(os.path.join(folder, "config.json"), "w"), indent=1)
    shutil.copy(tokenizer, os.path.join(folder, "tokenizer.model"))


def timed(cmd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ember", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--gguf-py", required=True, help="llama.cpp's gguf-py folder")
    p.add_argument("--model", default="")
    p.add_argument("--tokenizer", default="../shared/fixtures/tokenizers/llama2/tokenizer.model")
    p.add_argument("--types", default="q8_0,q4_k_m")
    p.add_argument("--imatrix", action="store_true", help="both quantize with the same synthetic importance matrix")
    args = p.parse_args()
    sys.path.insert(0, args.gguf_py)
    import gguf
    import llama_cpp

    os.makedirs(args.work, exist_ok=True)
    model = args.model or os.path.join(args.work, "llama7b-one-layer")
    if not args.model:
        seven_b_layer(model, args.tokenizer)
    f32 = os.path.join(args.work, "model-f32.gguf")
    f32_seconds = timed([args.ember, "export", "gguf", "--base", model, "--out", f32, "--type", "f32"])
    importance, imatrix = None, []
    if args.imatrix:
        from verify_llamacpp import write_importance_matrix
        path = os.path.join(args.work, "imatrix.gguf")
        importance, imatrix = write_importance_matrix(f32, path), ["--imatrix", path]
    for ty in args.types.split(","):
        ours, theirs = (os.path.join(args.work, f"model-{ty}-{who}.gguf") for who in ("ember", "llamacpp"))
        ember_seconds = timed([args.ember, "export", "gguf", "--base", model, "--out", ours, "--type", ty, *imatrix])
        from verify_llamacpp import llama_quantize
        start = time.perf_counter()
        llama_quantize(f32, theirs, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ty.upper()}"), importance)
        llama_seconds = time.perf_counter() - start
        a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        same = sum(a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)) for n in b)
        values = sum(int(np.prod(t.shape)) for t in b.values())
        print(json.dumps({"type": ty, "imatrix": args.imatrix, "parameters": values, "cores": os.cpu_count(), "ember_export_s": round(ember_seconds, 2),
                          "llama_quantize_from_f32_gguf_s": round(llama_seconds, 2), "ember_f32_export_s": round(f32_seconds, 2),
                          "same_bytes_tensors": f"{same}/{len(b)}", "mb": round(os.path.getsize(ours) / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
