"""A LLaMA-7B-shaped HF folder of seeded random bf16 weights (hidden 4096, MLP 11008, 32 layers,
vocabulary 32,000), written four layers a shard so the whole model is never in memory (13.5 GB on
disk), with the tokenizer files of a Llama-2 tokenizer folder (e.g. ../shared/fixtures/tokenizers/llama2,
whose tokenizer.model ember reads). For running 7B recipes end to end
where the real weights are absent (BENCHMARKS.md); needs torch and safetensors.

    python scripts/random_llama7b.py <out folder> <Llama-2 tokenizer folder>
"""
import json, os, shutil, glob, sys, torch
from safetensors.torch import save_file
out, tok = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
H, F, V, L = 4096, 11008, 32000, 32
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": F,
       "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": V,
       "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0, "hidden_act": "silu",
       "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
g = torch.Generator().manual_seed(0)
draw = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
weight_map, shard, n = {}, {}, 0
def flush():
    global shard, n
    if not shard: return
    name = f"model-{n:05d}.safetensors"; save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
    for k in shard: weight_map[k] = name
    shard = {}; n += 1
shard["model.embed_tokens.weight"] = draw(V, H); shard["lm_head.weight"] = draw(V, H)
shard["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16); flush()
for i in range(L):
    p = f"model.layers.{i}."
    for k in "qkvo": shard[p + f"self_attn.{k}_proj.weight"] = draw(H, H)
    shard[p + "mlp.gate_proj.weight"] = draw(F, H); shard[p + "mlp.up_proj.weight"] = draw(F, H); shard[p + "mlp.down_proj.weight"] = draw(H, F)
    shard[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16); shard[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    if i % 4 == 3: flush()
flush()
json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
for f in glob.glob(tok + "/tokenizer*") + glob.glob(tok + "/special_tokens_map.json"): shutil.copy(f, out)
print("written", n, "shards")
