"""ember's GGUF export checked by llama.cpp itself (run by scripts/verify-llamacpp.sh).

(a) SmolLM2 exported as f16: llama.cpp's greedy answers to 3 prompts equal ember's, and the
    last-position logits agree (max |difference| stated);
(b) ember's GGUF LoRA applied by llama.cpp on the SmolLM2 base GGUF reproduces ember's answers
    with the adapter;
(c) ember's gguf-lora tensors equal those of llama.cpp's convert_lora_to_gguf.py run on ember's
    PEFT adapter;
(d) `ember import gguf` of `ember export gguf` returns the weights: f32 bit for bit, f16 as the
    weights rounded to f16;
(e) perplexity on 50 Alpaca records: ember (f32) against llama.cpp on ember's f32, f16, q8_0 and
    q4_0 files;
(f) a LoRA adapter trained by ember directly on the q8_0 / q4_0 GGUF (its blocks as the frozen
    base), applied by llama.cpp to the same file: greedy answers equal ember's.
(g) the same on Q4_K_M, Q6_K, Q3_K_M, Q2_K, IQ4_NL, IQ4_XS, IQ3_M and IQ2_M (with a synthetic
    importance matrix) files made from ember's f32 export by llama.cpp's
    own quantizer (K-quants, with Q4_0/Q5_0/Q8_0 where a row is not whole 256-value blocks): the types it chose are
    listed, and ember imports each file to the values gguf-py dequantizes.
(h) Qwen2 (llama.cpp's `qwen2`: q/k/v biases, rows in HF order) and (i) LLaMA with Llama 3.1's
    RoPE scaling (llama.cpp's `rope_freqs` tensor): seeded random tiny models made by
    transformers (saved in its v5 config layout, RoPE under `rope_parameters`), exported f32 by
    ember; last-position logits of transformers, ember and llama.cpp on the same ids (prompts
    repeated to about 150 tokens for (i), where the long wavelengths turn), and their greedy
    answers.
(o) YaRN (Qwen2.5's long context), as (h): Qwen2 with its own attention factor and LLaMA with
    transformers' default one, exported with llama.cpp's YaRN keys.
(q) Qwen3 as llama.cpp's `qwen3` (per-head q/k norms, a head_dim other than hidden / heads), as (h).
(p) a LoRA with PEFT's rank_pattern / alpha_pattern (tests/fixtures/tiny_qwen2 lora_pattern) as
    ember's gguf-lora: llama.cpp's logits with the adapter against ember's.
(r) a LoRA on q/v, the token embedding and the LM head, trained by ember on tests/fixtures/tiny_llama,
    as ember's gguf-lora in llama.cpp: logits and greedy answers against ember's and against PEFT's
    (transformers + PEFT loading ember's adapter).
(j) the byte-level BPE pre-tokenizers ember reads back from a GGUF (`tokenizer.ggml.pre`: one
    name for each of llama.cpp's regex splits, 29): tiny_llama's and SmolLM2's vocabularies
    exported under each, the ids of ember's GGUF tokenizer equal llama.cpp's on texts with digits,
    contractions, newlines, case runs, slashes, CJK, kana, Hangul and full-width forms. Also a SentencePiece vocabulary with a user-defined piece (`<tool>`): ember's
    ids as a GGUF base equal llama.cpp's, which splits such pieces out of the text first.
(l) ember's own quantized files (`export gguf --type`: its fifteen quantized types, and with a
    matrix also the nine llama-quantize writes only with one: q2_k_s, iq3_xs, iq3_xxs, iq2_m,
    iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s) against
    llama.cpp's quantizer (llama-quantize's file types) run on ember's f32 export of the same
    model (SmolLM2; a 256-wide tiny LLaMA whose rows fill whole super-blocks; an 80-layer one with
    grouped KV heads, llama.cpp's 70B type; an 8-layer one with 4 query heads per KV head; a
    256-wide Qwen3 with head_dim 128 and its q/k norms, llama.cpp's `qwen3`): the
    type of every tensor, its bytes, and the perplexity of both files in llama.cpp. Again with an
    importance matrix (`--imatrix`) given to both: a synthetic one on every model, and on SmolLM2
    one of its real activations (transformers, on Alpaca records the perplexity does not use),
    with the perplexity it gains.
(k) the GLM family as llama.cpp's `chatglm` and `glm4`: seeded random tiny models with the real
    vocabularies (../shared/fixtures/tokenizers): ChatGLM3's layout (fused query_key_value,
    SentencePiece tokenizer.model with THUDM's specials), HF-native `glm` with GLM-4's tiktoken
    ranks, and GLM-4-0414 (transformers' Glm4ForCausalLM, llama.cpp's `glm4`) with the same ranks. llama.cpp's ids equal the reference ids of THUDM's tokenizers; last-position logits and
    greedy answers of ember and llama.cpp (and transformers for `glm`) on chat prompts; a LoRA
    trained by ember on each, applied with --lora and merged into the export; `ember import gguf`
    back to the checkpoint's layout; llama.cpp's own Q4_K_M of each as ember's base, a LoRA
    trained on its blocks, applied by llama.cpp to that file; the `glm` file against llama.cpp's
    own convert_hf_to_gguf.py (tensors, and the metadata keys that differ) for both GLM-4 layouts.
(m) `ember imatrix` against llama.cpp's llama-imatrix on ember's f32 export, on the same text
    (Alpaca records 50-199), for SmolLM2 and for SmolLM2 with (b)'s LoRA merged: entry names,
    token counts, chunks and each entry's mean squares; then the perplexity of quantized files
    made with each matrix, and with ember's matrix of the same records rendered as training sees
    them.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np

# Seeded random tiny models (argv: out dir, a tokenizer dir), weights wide enough that the
# logits differ per token: Qwen2, and LLaMA with Llama 3.1's RoPE scaling.
MAKE_TINY = """
import os, shutil, sys, torch, transformers
out, tokenizer, kind = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
shape = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
if kind == 'qwen2':
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=1e6, **shape))
elif kind == 'qwen3':
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(rope_theta=1e6, head_dim=32, **shape))
elif kind == 'qwen2_yarn':
    # Qwen2.5's long-context switch, with the attention factor given as well.
    scaling = {'rope_type': 'yarn', 'rope_theta': 1e6, 'factor': 4.0, 'original_max_position_embeddings': 64,
               'attention_factor': 1.3}
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_parameters=scaling, **shape))
elif kind == 'llama_yarn':
    scaling = {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 8.0, 'original_max_position_embeddings': 128}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_parameters=scaling, **shape))
else:
    scaling = {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 8192}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_parameters=scaling, **shape))
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(1 + 0.1 * torch.randn_like(p) if 'norm' in name else 0.15 * torch.randn_like(p))
model.save_pretrained(out, safe_serialization=True)
for f in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
    shutil.copy(os.path.join(tokenizer, f), out)
"""

# Last-position logits and a greedy answer of a transformers model (argv: dir, ids JSON, new tokens).
HF_ANSWER = """
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    last = model(ids).logits[0, -1].tolist()
    answer = model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)[0, ids.shape[1]:].tolist()
print(json.dumps({"last_logits": last, "answer_ids": answer}))
"""

# Seeded random tiny GLM-family models with a real vocabulary (argv: out dir, tokenizers dir, kind):
# glm4 = HF-native `glm` (transformers' GlmForCausalLM) with GLM-4's tiktoken ranks; glm4_0414 = the same as
# transformers' Glm4ForCausalLM (GLM-4-0414: norms on the attention's and the MLP's output); chatglm3 =
# THUDM's layout, which transformers has no class for, with ChatGLM3's SentencePiece model.
MAKE_GLM = """
import json, os, shutil, sys, torch, transformers
from safetensors.torch import save_file
out, tokenizers, kind = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
os.makedirs(out, exist_ok=True)
def rand(*shape, norm=False):
    return 1 + 0.1 * torch.randn(*shape) if norm else 0.15 * torch.randn(*shape)
if kind in ('glm4', 'glm4_0414'):
    config, causal_lm = (transformers.GlmConfig, transformers.GlmForCausalLM) if kind == 'glm4' else (transformers.Glm4Config, transformers.Glm4ForCausalLM)
    cfg = config(vocab_size=151552, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, max_position_embeddings=512, rms_norm_eps=1.5625e-7,
        attention_bias=True, tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338])
    model = causal_lm(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(rand(*p.shape, norm='norm' in name))
    model.save_pretrained(out, safe_serialization=True)
    for f in ('tokenizer.model', 'tokenization_chatglm.py'):
        shutil.copy(os.path.join(tokenizers, 'glm4_9b_chat', f), out)
else:
    h, ffn, heads, groups, d, vocab = 64, 128, 4, 2, 16, 65024
    t = {'transformer.embedding.word_embeddings.weight': rand(vocab, h), 'transformer.encoder.final_layernorm.weight': rand(h, norm=True),
         'transformer.output_layer.weight': rand(vocab, h)}
    for i in range(2):
        p = f'transformer.encoder.layers.{i}.'
        t[p + 'input_layernorm.weight'] = rand(h, norm=True)
        t[p + 'post_attention_layernorm.weight'] = rand(h, norm=True)
        t[p + 'self_attention.query_key_value.weight'] = rand(heads * d + 2 * groups * d, h)
        t[p + 'self_attention.query_key_value.bias'] = rand(heads * d + 2 * groups * d)
        t[p + 'self_attention.dense.weight'] = rand(h, heads * d)
        t[p + 'mlp.dense_h_to_4h.weight'] = rand(2 * ffn, h)
        t[p + 'mlp.dense_4h_to_h.weight'] = rand(h, ffn)
    save_file(t, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
    src = os.path.join(tokenizers, 'chatglm3_6b')
    config = json.load(open(os.path.join(src, 'config.json')))
    config.update(hidden_size=h, ffn_hidden_size=ffn, kv_channels=d, num_attention_heads=heads, multi_query_group_num=groups,
                  num_layers=2, seq_length=512, torch_dtype='float32')
    json.dump(config, open(os.path.join(out, 'config.json'), 'w'), indent=2)
    for f in ('tokenizer.model', 'tokenizer_config.json', 'tokenization_chatglm.py'):
        shutil.copy(os.path.join(src, f), out)
"""

GLM_PROMPTS = ["你好，请介绍一下北京。", "Give three tips for staying healthy.", "用一句话解释什么是机器学习"]

PRE_TEXTS = ["It's 12345 o'clock!\n\nDON'T stop", "Numbers 2024-12-02, 3.14159 and 1000000", "  spaces\tand\ttabs  \n", "你好，世界 123",
             "HTTPServer parses URLs/paths: a/b/c; camelCaseWords and ÀÉÎ façade", "深度求索 DeepSeek-V2 ２０２４年 ＡＢＣ δ-function, 한국어 텍스트！",
             "Wait... (yes|no)?! I'm SO sure—it's 100%…", "カタカナとひらがな、ｶﾀｶﾅ 1234567 items: naïve café's x+y=z/2 $5^2 ~|`<tag>\r\n\n  end"]

PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.", "Write a haiku about the sea."]


def run(cmd, **kw):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw).stdout


def safetensors_read(path):
    """name -> float32 array, for F32/F16/BF16 safetensors files (no torch needed)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        if info["dtype"] == "F32":
            v = np.frombuffer(raw, np.float32)
        elif info["dtype"] == "F16":
            v = np.frombuffer(raw, np.float16).astype(np.float32)
        elif info["dtype"] == "BF16":
            v = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            continue
        out[name] = v.reshape(info["shape"])
    return out


GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_name_matches(gguf_name, hf_name):
    """Whether a GGUF tensor name (`blk.3.attn_q.weight`) is the HF one (`model.layers.3.self_attn.q_proj.weight`)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return hf_name == f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[3]}"
    return hf_name == f"{GGUF_TO_HF[parts[0]]}.{parts[1]}"


def llama_quantize(src, dst, ftype, importance=None):
    """llama.cpp's quantizer (llama-quantize's library call) from an f32/f16 GGUF; `importance`:
    per tensor name, the f32 column importances it is given (its `--imatrix`)."""
    import ctypes
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if importance:
        values = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in importance.items()}
        names = {name: name.encode() for name in values}
        entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
        for entry, (name, v) in zip(entries, values.items()):
            entry.name, entry.data, entry.size = names[name], v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        entries[len(values)].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    print(f"$ llama_model_quantize {src} {dst} ftype {ftype}{' with an importance matrix' if importance else ''}", flush=True)
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} failed")


def write_importance_matrix(model_gguf, path, seed=0):
    """A synthetic importance matrix in llama-imatrix's GGUF layout (per matrix but the token
    embedding: sums of squared activations `<name>.in_sum2` and `<name>.counts`) for every matrix
    of `model_gguf`; returns what llama.cpp's loader makes of it, sums / count, by name."""
    import gguf
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["synthetic"])
    writer.add_uint32("imatrix.chunk_count", 10)
    writer.add_uint32("imatrix.chunk_size", 512)
    importance = {}
    for t in gguf.GGUFReader(model_gguf).tensors:
        if len(t.shape) < 2 or t.name == "token_embd.weight":
            continue
        columns, count = int(t.shape[0]), np.float32(7)
        sums = (np.exp(rng.standard_normal(columns)) * 7).astype(np.float32)
        writer.add_tensor(t.name + ".in_sum2", sums.reshape(1, columns))
        writer.add_tensor(t.name + ".counts", np.array([[count]], dtype=np.float32))
        importance[t.name] = sums / count
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return importance


def llama_answer(llm, ids, max_new):
    """Greedy continuation of `ids` by llama.cpp, and the logits at the prompt's last position."""
    llm.reset()
    llm.eval(ids)
    last = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos() or len(out) >= max_new:
            break
        out.append(token)
    return out, last


def perplexity(llm, examples):
    """llama.cpp's perplexity over the tokens that carry loss in ember's `data preview --json` examples."""
    nll, count = 0.0, 0
    for ex in examples:
        ids, labels = ex["input_ids"], ex["labels"]
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        for t in range(len(ids) - 1):
            if labels[t + 1] == -100:
                continue
            row = scores[t]
            m = row.max()
            nll += m + math.log(np.exp(row - m).sum()) - row[labels[t + 1]]
            count += 1
    return math.exp(nll / count)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ember", required=True)
    p.add_argument("--smollm2", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--llama-cpp", required=True, help="the vendored llama.cpp source (convert_lora_to_gguf.py, gguf-py)")
    p.add_argument("--reference-python", default="", help="a Python with torch + transformers + safetensors for (c)")
    p.add_argument("--data", required=True, help="Alpaca JSON; its first 50 records are used for (e)")
    p.add_argument("--data-zh", required=True, help="Chinese Alpaca JSON, trained on in (k)")
    p.add_argument("--tokenizers", default="", help="the shared fixtures' tokenizers folder (chatglm3_6b, glm4_9b_chat) for (k)")
    p.add_argument("--glm-kinds", default="", help="(k) only for these models: chatglm3, glm4, glm4_0414 (default: all)")
    p.add_argument("--llama-imatrix", default="", help="llama.cpp's llama-imatrix binary, for (m)")
    args = p.parse_args()
    from llama_cpp import Llama

    ember, base, work = args.ember, args.smollm2, args.work
    os.makedirs(work, exist_ok=True)
    report = []

    # (a) f16 export: greedy answers and last-position logits.
    f16 = os.path.join(work, "smollm2-f16.gguf")
    run([ember, "export", "gguf", "--base", base, "--out", f16, "--type", "f16"])
    llm = Llama(model_path=f16, n_ctx=1024, logits_all=True, verbose=False)
    equal, worst = 0, 0.0
    for i, prompt in enumerate(PROMPTS):
        dump = os.path.join(work, f"ember-a{i}.json")
        text = run([ember, "generate", "--base", base, "--prompt", prompt, "--template", "auto", "--max-new-tokens", "24", "--logits-out", dump]).rstrip("\n")
        ours = json.load(open(dump))
        theirs, last = llama_answer(llm, ours["prompt_ids"], len(ours["answer_ids"]))
        same = theirs == [t for t in ours["answer_ids"] if t != llm.token_eos()]
        equal += same
        diff = float(np.abs(last - np.array(ours["last_logits"], dtype=np.float32)).max())
        worst = max(worst, diff)
        print(f"(a) {prompt!r}: ember {text!r} | llama.cpp {llm.detokenize(theirs).decode(errors='replace')!r} | same ids: {same} | max |logit diff| {diff:.4f}")
    report.append(f"(a) SmolLM2 f16 GGUF: greedy answers equal {equal}/{len(PROMPTS)}; last-position logits max |diff| {worst:.4f} (ember f32 vs llama.cpp f16 weights)")
    del llm

    # (b) a LoRA adapter through llama.cpp's --lora path.
    run_dir = os.path.join(work, "lora-run")
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "smollm2-lora.toml")
    run([ember, "train", recipe, "--quiet", "--overwrite", "--set", "train.max_steps=12", "--set", "train.lr=3e-3",
         "--set", f'output.dir="{run_dir}"', "--set", f'model.path="{os.path.abspath(base)}"'])
    adapter = os.path.join(run_dir, "adapter")
    lora_gguf = os.path.join(work, "smollm2-lora.gguf")
    run([ember, "export", "gguf-lora", "--base", base, "--adapter", adapter, "--out", lora_gguf])
    llm = Llama(model_path=f16, lora_path=lora_gguf, n_ctx=1024, logits_all=True, verbose=False)
    equal, changed = 0, 0
    for i, prompt in enumerate(PROMPTS):
        dump = os.path.join(work, f"ember-b{i}.json")
        text = run([ember, "generate", "--base", base, "--adapter", adapter, "--prompt", prompt, "--template", "auto", "--max-new-tokens", "24", "--logits-out", dump]).rstrip("\n")
        ours = json.load(open(dump))
        base_answer = json.load(open(os.path.join(work, f"ember-a{i}.json")))["answer_ids"]
        changed += ours["answer_ids"] != base_answer
        theirs, _ = llama_answer(llm, ours["prompt_ids"], len(ours["answer_ids"]))
        same = theirs == [t for t in ours["answer_ids"] if t != llm.token_eos()]
        equal += same
        print(f"(b) {prompt!r}: ember+adapter {text!r} | llama.cpp --lora {llm.detokenize(theirs).decode(errors='replace')!r} | same ids: {same}")
    report.append(f"(b) LoRA GGUF in llama.cpp on the f16 base: answers equal ember's with the adapter {equal}/{len(PROMPTS)} (the adapter changed {changed}/{len(PROMPTS)} of the base's answers)")
    del llm

    # (c) against llama.cpp's own converter of the same PEFT adapter.
    sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
    import gguf
    if args.reference_python:
        theirs_path = os.path.join(work, "smollm2-lora-convert.gguf")
        env = dict(os.environ, PYTHONPATH=os.path.join(args.llama_cpp, "gguf-py"))
        run([args.reference_python, os.path.join(args.llama_cpp, "convert_lora_to_gguf.py"), adapter, "--base", base,
             "--outtype", "f32", "--outfile", theirs_path], env=env)
        ours_r, theirs_r = gguf.GGUFReader(lora_gguf), gguf.GGUFReader(theirs_path)
        ot = {t.name: np.array(t.data, dtype=np.float32) for t in ours_r.tensors}
        tt = {t.name: np.array(t.data, dtype=np.float32) for t in theirs_r.tensors}
        same_names = sorted(ot) == sorted(tt)
        diff = max(float(np.abs(ot[k] - tt[k]).max()) for k in ot) if same_names else float("nan")
        alpha = lambda r: float(r.fields["adapter.lora.alpha"].parts[-1][0])
        report.append(f"(c) gguf-lora vs convert_lora_to_gguf.py: {len(ot)} tensors, same names and shapes: {same_names}, max |diff| {diff}, alpha {alpha(ours_r)} vs {alpha(theirs_r)}")
    else:
        report.append("(c) skipped: give --reference-python (torch + transformers) to run convert_lora_to_gguf.py")

    # (d) export then import returns the weights.
    original = safetensors_read(os.path.join(base, "model.safetensors"))
    for ty in ("f32", "f16"):
        path = os.path.join(work, f"smollm2-{ty}.gguf")
        if ty == "f32":
            run([ember, "export", "gguf", "--base", base, "--out", path, "--type", ty])
        back = os.path.join(work, f"imported-{ty}")
        run([ember, "import", "gguf", path, "--out", back])
        imported = safetensors_read(os.path.join(back, "model.safetensors"))
        keys = sorted(original)
        if ty == "f32":
            exact = all(np.array_equal(original[k], imported[k]) for k in keys)
            report.append(f"(d) f32 export -> import: {len(keys)} tensors, bit for bit: {exact}")
        else:
            # matrices were stored as f16, vectors as f32
            rounded = {k: (v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v) for k, v in original.items()}
            exact = all(np.array_equal(rounded[k], imported[k]) for k in keys)
            worst = max(float(np.abs(original[k] - imported[k]).max()) for k in keys)
            report.append(f"(d) f16 export -> import: equal to the weights rounded to f16: {exact}; max |diff| to the f32 weights {worst:.2e}")

    # (e) perplexity over the answer tokens of 50 Alpaca records.
    records = json.load(open(args.data))[:50]
    data50 = os.path.join(work, "alpaca50.json")
    json.dump(records, open(data50, "w"), ensure_ascii=False)
    ember_eval = json.loads(run([ember, "eval", "--base", base, "--data", data50, "--template", "alpaca", "--cutoff-len", "256"]).strip().splitlines()[-1])
    recipe50 = os.path.join(work, "alpaca50.toml")
    open(recipe50, "w").write(f'[model]\npath = "{os.path.abspath(base)}"\n[adapter]\nmethod = "lora"\n[data]\npath = "{data50}"\ntemplate = "alpaca"\ncutoff_len = 256\n[train]\nmax_steps = 1\n[output]\ndir = "{work}/unused"\n')
    examples = [json.loads(l) for l in run([ember, "data", "preview", recipe50, "--json", "--limit", "50"]).splitlines()]
    lines = [f"(e) perplexity over the answer tokens of 50 Alpaca records (cutoff 256): ember f32 {ember_eval['base']['perplexity']:.4f}"]
    for ty in ("f32", "f16", "q8_0", "q4_0"):
        path = os.path.join(work, f"smollm2-{ty}.gguf")
        if not os.path.exists(path):
            run([ember, "export", "gguf", "--base", base, "--out", path, "--type", ty])
        llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False)
        lines.append(f"llama.cpp {ty} {perplexity(llm, examples):.4f} ({os.path.getsize(path) / 1e6:.0f} MB)")
        del llm
    report.append("; ".join(lines))

    # (f) train on the quantized GGUF itself (issue 14) and run the adapter on that file in llama.cpp.
    # llama.cpp's q8_0/q4_0 products also quantize the activations to 8 bits, which ember (like
    # PyTorch) does not, so the base's logits differ by about what quantizing the weights costs:
    # the answers are compared, and the perplexity with and without the adapter on both sides.
    import llama_cpp
    # (g) llama.cpp's quantizer chooses the types; ember must read all it wrote.
    quantizer = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
                 "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M, "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
                 "iq4_nl": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL, "iq4_xs": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS,
                 "iq3_m": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ3_M, "iq2_m": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ2_M}
    for ty in ("q8_0", "q4_0", *quantizer):
        path = os.path.join(work, f"smollm2-{ty}.gguf")
        if ty in quantizer:
            ftype = quantizer[ty]
            # iq2_m only with an importance matrix, as llama-quantize: a synthetic one.
            importance = write_importance_matrix(os.path.join(work, "smollm2-f32.gguf"), os.path.join(work, "smollm2-imatrix-g.gguf")) if ty in NEEDS_IMPORTANCE else None
            llama_quantize(os.path.join(work, "smollm2-f32.gguf"), path, ftype, importance)
            reader = gguf.GGUFReader(path)
            kinds = {}
            for t in reader.tensors:
                kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            back = os.path.join(work, f"imported-{ty}")
            run([ember, "import", "gguf", path, "--out", back])
            imported = safetensors_read(os.path.join(back, "model.safetensors"))
            # Values compared as sorted multisets per tensor: llama.cpp's q/k row permutation is
            # undone by the import, and a tensor's values are the same either way.
            pairs = [(t, name) for t in reader.tensors for name in imported if gguf_name_matches(t.name, name)]
            same = sum(
                np.array_equal(np.sort(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).ravel()), np.sort(imported[name].ravel()))
                for t, name in pairs
            )
            report.append(f"(g) {ty}: llama.cpp's quantizer wrote {dict(sorted(kinds.items()))} ({os.path.getsize(path) / 1e6:.0f} MB); "
                          f"ember import equals gguf-py's dequantization for {same} of {len(pairs)} tensors ({len(reader.tensors)} in the file)")
        report.append(train_on_gguf(ember, recipe, work, ty, path, data50, examples, "g" if ty in quantizer else "f"))

    # (n) an NVFP4 checkpoint as llama.cpp's converter writes one, with an MXFP4 ffn_down.
    report.extend(verify_fp4(ember, recipe, work, data50, examples))

    # (h) Qwen2 through llama.cpp's qwen2 architecture; (i) Llama 3.1's RoPE scaling; (o) YaRN; (q) Qwen3.
    report.extend(verify_tiny_random(args, ember, work))
    # (p) a LoRA with PEFT's rank_pattern / alpha_pattern through gguf-lora.
    report.append(verify_lora_patterns(ember, work))
    # (r) LoRA on the embedding and the LM head through gguf-lora.
    report.append(verify_vocab_lora(args, ember, work))

    # (j) pre-tokenizers: ember's GGUF tokenizer against llama.cpp's on the same file.
    report.extend(verify_pre_tokenizers(ember, base, work))
    report.append(verify_sentencepiece(ember, work))

    # (l) ember's K-quant mixtures against llama.cpp's quantizer.
    wide = wide_tiny_llama(ember, work)
    models = {"SmolLM2": base, "256-wide tiny LLaMA": wide}
    if args.reference_python:
        models["80-layer GQA tiny LLaMA (llama.cpp's 70B type)"] = random_tiny_llama(wide, work, args.reference_python, 80, 4, 2, 64)
        models["8-layer tiny LLaMA, 4 query heads per KV head"] = random_tiny_llama(wide, work, args.reference_python, 8, 8, 2, 32)
        models["256-wide tiny Qwen3 (head_dim 128)"] = random_tiny_qwen3(wide, work, args.reference_python)
    report.extend(verify_k_quants(ember, models, work, examples))
    report.extend(verify_k_quants(ember, models, work, [], with_importance=True))
    if args.reference_python:
        report.extend(verify_real_importance(args, ember, base, work, examples))

    # (m) ember's importance matrix against llama-imatrix's.
    if args.llama_imatrix:
        report.extend(verify_imatrix(args, ember, base, adapter, work, examples))
    else:
        report.append("(m) skipped: give --llama-imatrix (built by verify-llamacpp.sh)")

    # (k) the GLM family as llama.cpp's chatglm.
    if args.reference_python and args.tokenizers:
        report.extend(verify_glm(args, ember, work))
    else:
        report.append("(k) skipped: give --reference-python (torch + transformers) and --tokenizers (the shared fixtures' tokenizers)")

    print("\n==== verify-llamacpp report ====")
    for line in report:
        print(line)


def train_on_gguf(ember, recipe, work, ty, path, data50, examples, part):
    """(f)/(g): a LoRA trained by ember for 12 steps with the GGUF `path` as its base, exported with
    gguf-lora and run by llama.cpp on that file: the report line (answers, logits, perplexity)."""
    from llama_cpp import Llama
    run_dir = os.path.join(work, f"lora-on-{ty}")
    run([ember, "train", recipe, "--quiet", "--overwrite", "--set", "train.max_steps=12", "--set", "train.lr=3e-3",
         "--set", f'output.dir="{run_dir}"', "--set", f'model.path="{path}"'])
    adapter = os.path.join(run_dir, "adapter")
    lora_gguf = os.path.join(work, f"lora-on-{ty}.gguf")
    run([ember, "export", "gguf-lora", "--base", path, "--adapter", adapter, "--out", lora_gguf])
    results = {}
    for with_adapter in (False, True):
        llm = Llama(model_path=path, lora_path=lora_gguf if with_adapter else None, n_ctx=1024, logits_all=True, verbose=False)
        equal, worst = 0, 0.0
        for i, prompt in enumerate(PROMPTS):
            dump = os.path.join(work, f"ember-f-{ty}-{with_adapter}-{i}.json")
            extra = ["--adapter", adapter] if with_adapter else []
            text = run([ember, "generate", "--base", path, *extra, "--prompt", prompt, "--template", "auto", "--max-new-tokens", "24", "--logits-out", dump]).rstrip("\n")
            ours = json.load(open(dump))
            theirs, last = llama_answer(llm, ours["prompt_ids"], len(ours["answer_ids"]))
            same = theirs == [t for t in ours["answer_ids"] if t != llm.token_eos()]
            equal += same
            worst = max(worst, float(np.abs(last - np.array(ours["last_logits"], dtype=np.float32)).max()))
            print(f"({part}) {ty} adapter {with_adapter} {prompt!r}: ember {text!r} | llama.cpp {llm.detokenize(theirs).decode(errors='replace')!r} | same ids: {same}")
        extra = ["--adapter", adapter] if with_adapter else []
        ours_eval = json.loads(run([ember, "eval", "--base", path, *extra, "--data", data50, "--template", "alpaca", "--cutoff-len", "256"]).strip().splitlines()[-1])
        ours_ppl = ours_eval["adapter" if with_adapter else "base"]["perplexity"]
        results[with_adapter] = (equal, worst, ours_ppl, perplexity(llm, examples))
        del llm
    (b_eq, b_worst, b_ours, b_theirs), (a_eq, a_worst, a_ours, a_theirs) = results[False], results[True]
    return (f"({part}) {ty} GGUF as the base, LoRA trained by ember on its blocks: perplexity (50 records) ember {b_ours:.4f} -> {a_ours:.4f} with the adapter, "
            f"llama.cpp --lora {b_theirs:.4f} -> {a_theirs:.4f}; greedy answers equal {a_eq}/{len(PROMPTS)} with the adapter, {b_eq}/{len(PROMPTS)} without; "
            f"last-position logits max |diff| {a_worst:.3f} with, {b_worst:.3f} without")


def fp4_smollm2(work):
    """SmolLM2 (its f32 GGUF in `work`) as llama.cpp's converter writes a ModelOpt NVFP4 checkpoint:
    attention and gate/up projections NVFP4 with their per-tensor `.scale` and `.input_scale`,
    ffn_down MXFP4 (gguf-py's quantizer), the rest as in the f32 file."""
    import gguf
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    from generate_ggml_quants import copy_field, nvfp4_blocks
    source = gguf.GGUFReader(os.path.join(work, "smollm2-f32.gguf"))
    path = os.path.join(work, "smollm2-nvfp4.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for field in source.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            copy_field(writer, field)
    for t in source.tensors:
        values = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        stem, kind = t.name.rsplit(".", 1)[0], t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if kind == "ffn_down":
            writer.add_tensor(t.name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.MXFP4), raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        elif kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            blocks, tensor_scale = nvfp4_blocks(values)
            writer.add_tensor(t.name, blocks, raw_dtype=gguf.GGMLQuantizationType.NVFP4)
            writer.add_tensor(f"{stem}.scale", np.array([tensor_scale], dtype=np.float32))
            writer.add_tensor(f"{stem}.input_scale", np.array([1.0], dtype=np.float32))
        else:
            writer.add_tensor(t.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def verify_fp4(ember, recipe, work, data50, examples):
    """(n): SmolLM2 as an NVFP4 checkpoint: ember's import equals gguf-py's dequantization times
    the tensor scale (to rounding: ember folds the scale into each sub-block's), and a LoRA trained on
    its blocks runs in llama.cpp (`train_on_gguf`)."""
    import gguf
    path = fp4_smollm2(work)
    back = os.path.join(work, "imported-nvfp4")
    run([ember, "import", "gguf", path, "--out", back])
    imported = safetensors_read(os.path.join(back, "model.safetensors"))
    reader = gguf.GGUFReader(path)
    scales = {t.name.rsplit(".", 1)[0]: float(t.data[0]) for t in reader.tensors if t.name.endswith(".scale")}
    worst, compared = 0.0, 0
    for t in reader.tensors:
        if t.tensor_type.name not in ("NVFP4", "MXFP4"):
            continue
        ours = next(imported[name] for name in imported if gguf_name_matches(t.name, name))
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) * np.float32(scales.get(t.name.rsplit(".", 1)[0], 1.0))
        # Sorted per tensor, as in (g): the import undoes llama.cpp's q/k row order.
        diff = np.abs(np.sort(ours.ravel()) - np.sort(theirs.ravel())) / (np.abs(theirs).max() or 1.0)
        worst, compared = max(worst, float(diff.max())), compared + 1
    line = (f"(n) SmolLM2 as an NVFP4 checkpoint (NVFP4 projections with tensor scales, MXFP4 ffn_down; {os.path.getsize(path) / 1e6:.0f} MB): "
            f"ember's import of {compared} FP4 tensors equals gguf-py's dequantization times the scale within {worst:.1e} of each tensor's largest value")
    return [line, train_on_gguf(ember, recipe, work, "nvfp4", path, data50, examples, "n")]


TINY_RANDOM = (("h", "qwen2", "Qwen2 as llama.cpp's qwen2", 1), ("i", "llama3", "LLaMA with Llama 3.1 RoPE scaling (rope_freqs)", 8),
               ("o", "qwen2_yarn", "Qwen2 with YaRN and its own attention factor", 8), ("o", "llama_yarn", "LLaMA with YaRN", 8),
               ("q", "qwen3", "Qwen3 as llama.cpp's qwen3 (per-head q/k norms, head_dim 32)", 1))


def verify_tiny_random(args, ember, work, cases=TINY_RANDOM):
    """Seeded random tiny models made by transformers, exported f32 by ember: transformers', ember's
    and llama.cpp's last-position logits and greedy answers on the same ids."""
    from llama_cpp import Llama
    report = []
    for part, kind, what, repeat in cases:
        if not args.reference_python:
            report.append(f"({part}) skipped: give --reference-python (torch + transformers) to make the model")
            continue
        model = os.path.join(work, f"tiny_{kind}")
        tiny_llama = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny_llama")
        run([args.reference_python, "-c", MAKE_TINY, model, tiny_llama, kind])
        model_gguf = os.path.join(work, f"tiny-{kind}-f32.gguf")
        # tiny_llama's trained BPE is not one llama.cpp knows by its hash: name the pre-tokenizer.
        run([ember, "export", "gguf", "--base", model, "--out", model_gguf, "--type", "f32", "--pre", "gpt-2"])
        llm = Llama(model_path=model_gguf, n_ctx=512, logits_all=True, verbose=False)
        worst_ours, worst_theirs, same, tokens = 0.0, 0.0, 0, 0
        for i, prompt in enumerate(PROMPTS):
            dump = os.path.join(work, f"ember-{part}{kind}{i}.json")
            run([ember, "generate", "--base", model, "--prompt", " ".join([prompt] * repeat), "--template", "none", "--max-new-tokens", "8", "--logits-out", dump])
            ours = json.load(open(dump))
            tokens = max(tokens, len(ours["prompt_ids"]))
            reference = json.loads(run([args.reference_python, "-c", HF_ANSWER, model, json.dumps(ours["prompt_ids"]), str(len(ours["answer_ids"]))]))
            theirs, last = llama_answer(llm, ours["prompt_ids"], len(ours["answer_ids"]))
            hf_last = np.array(reference["last_logits"], dtype=np.float32)
            worst_ours = max(worst_ours, float(np.abs(np.array(ours["last_logits"], dtype=np.float32) - hf_last).max()))
            worst_theirs = max(worst_theirs, float(np.abs(last - hf_last).max()))
            same += theirs == ours["answer_ids"] == reference["answer_ids"]
            print(f"({part}) {prompt!r} x{repeat}: transformers {reference['answer_ids']} | ember {ours['answer_ids']} | llama.cpp {theirs}")
        del llm
        report.append(f"({part}) tiny random {what}, made by transformers, ember's f32 GGUF in llama.cpp (prompts up to {tokens} tokens): "
                      f"last-position logits max |diff| to transformers: llama.cpp {worst_theirs:.2e}, ember {worst_ours:.2e}; "
                      f"greedy answers (8 tokens) equal on all three {same}/{len(PROMPTS)}")
    return report


def verify_lora_patterns(ember, work):
    """tests/fixtures/tiny_qwen2's lora_pattern (PEFT's rank_pattern and alpha_pattern, layer 1 only)
    as ember's gguf-lora on ember's f32 export, in llama.cpp: last-position logits against ember's."""
    from llama_cpp import Llama
    fixture = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny_qwen2")
    adapter = os.path.join(fixture, "adapters", "lora_pattern")
    base_gguf, lora_gguf = os.path.join(work, "tiny-qwen2-fixture-f32.gguf"), os.path.join(work, "tiny-qwen2-lora-pattern.gguf")
    run([ember, "export", "gguf", "--base", fixture, "--out", base_gguf, "--type", "f32", "--pre", "gpt-2"])
    run([ember, "export", "gguf-lora", "--base", fixture, "--adapter", adapter, "--out", lora_gguf])
    worst, moved = 0.0, 0.0
    for prompt in PROMPTS:
        lasts = []
        for with_lora in (False, True):
            dump = os.path.join(work, "ember-p.json")
            run([ember, "generate", "--base", fixture, "--prompt", prompt, "--template", "none", "--max-new-tokens", "1", "--logits-out", dump]
                + (["--adapter", adapter] if with_lora else []))
            ours = json.load(open(dump))
            llm = Llama(model_path=base_gguf, lora_path=lora_gguf if with_lora else None, n_ctx=256, logits_all=True, verbose=False)
            _, last = llama_answer(llm, ours["prompt_ids"], 0)
            del llm
            worst = max(worst, float(np.abs(last - np.array(ours["last_logits"], dtype=np.float32)).max()))
            lasts.append(last)
        moved = max(moved, float(np.abs(lasts[1] - lasts[0]).max()))
    return (f"(p) a LoRA with rank_pattern, alpha_pattern and layers_to_transform (tiny_qwen2 lora_pattern) as ember's gguf-lora in llama.cpp: "
            f"last-position logits max |diff| to ember {worst:.2e}, with and without the adapter (which moves them by up to {moved:.2f})")


# Last-position logits and a greedy answer of transformers + PEFT (argv: base dir, adapter dir, ids JSON, new tokens).
PEFT_ANSWER = """
import json, sys, torch, transformers, peft
base = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = peft.PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.tensor([json.loads(sys.argv[3])])
with torch.no_grad():
    last = model(ids).logits[0, -1].tolist()
    answer = model.generate(input_ids=ids, max_new_tokens=int(sys.argv[4]), do_sample=False)[0, ids.shape[1]:].tolist()
print(json.dumps({"last_logits": last, "answer_ids": answer}))
"""


def verify_vocab_lora(args, ember, work):
    """(r): a LoRA on q/v, embed_tokens and lm_head trained by ember (recipes/ci/tiny-lora.toml, 10
    steps) on tests/fixtures/tiny_llama, as ember's gguf-lora on ember's f32 export in llama.cpp."""
    from llama_cpp import Llama
    here = os.path.dirname(os.path.abspath(__file__))
    fixture = os.path.join(here, "..", "tests", "fixtures", "tiny_llama")
    run_dir = os.path.join(work, "lora-vocab")
    run([ember, "train", os.path.join(here, "..", "recipes", "ci", "tiny-lora.toml"), "--quiet", "--overwrite",
         "--set", 'adapter.target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]', "--set", f'output.dir="{run_dir}"'])
    adapter = os.path.join(run_dir, "adapter")
    base_gguf, lora_gguf = os.path.join(work, "tiny-llama-fixture-f32.gguf"), os.path.join(work, "tiny-llama-lora-vocab.gguf")
    run([ember, "export", "gguf", "--base", fixture, "--out", base_gguf, "--type", "f32", "--pre", "gpt-2"])
    run([ember, "export", "gguf-lora", "--base", fixture, "--adapter", adapter, "--out", lora_gguf])
    llm = Llama(model_path=base_gguf, lora_path=lora_gguf, n_ctx=256, logits_all=True, verbose=False)
    worst, worst_peft, same, moved = 0.0, None, 0, 0.0
    for i, prompt in enumerate(PROMPTS):
        dumps = [os.path.join(work, f"ember-r{i}-{with_lora}.json") for with_lora in (False, True)]
        for dump, extra in zip(dumps, ([], ["--adapter", adapter])):
            run([ember, "generate", "--base", fixture, *extra, "--prompt", prompt, "--template", "none", "--max-new-tokens", "8", "--logits-out", dump])
        base_run, ours = (json.load(open(d)) for d in dumps)
        theirs, last = llama_answer(llm, ours["prompt_ids"], len(ours["answer_ids"]))
        ours_last = np.array(ours["last_logits"], dtype=np.float32)
        worst = max(worst, float(np.abs(last - ours_last).max()))
        moved = max(moved, float(np.abs(ours_last - np.array(base_run["last_logits"], dtype=np.float32)).max()))
        agree = theirs == ours["answer_ids"]
        if args.reference_python:
            peft_run = json.loads(run([args.reference_python, "-c", PEFT_ANSWER, fixture, adapter, json.dumps(ours["prompt_ids"]), str(len(ours["answer_ids"]))]))
            worst_peft = max(worst_peft or 0.0, float(np.abs(np.array(peft_run["last_logits"], dtype=np.float32) - ours_last).max()))
            agree = agree and peft_run["answer_ids"] == ours["answer_ids"]
        same += agree
        print(f"(r) {prompt!r}: ember {ours['answer_ids']} | llama.cpp {theirs}")
    del llm
    peft_part = f", PEFT loading ember's adapter {worst_peft:.2e}" if worst_peft is not None else ""
    return (f"(r) a LoRA on q/v, the embedding and the LM head trained by ember on tiny_llama (10 steps; it moves ember's last logits by up to {moved:.2f}) "
            f"as ember's gguf-lora in llama.cpp: last-position logits max |diff| to ember: llama.cpp {worst:.2e}{peft_part}; "
            f"greedy answers (8 tokens) equal {same}/{len(PROMPTS)}{' on all three' if worst_peft is not None else ''}")


def wide_tiny_llama(ember, work):
    """A 256-wide one-layer LLaMA folder: the K-quant fixture imported as f32."""
    folder = os.path.join(work, "tiny-wide")
    fixture = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ggml_quants", "tiny_llama_kquants.gguf")
    run([ember, "import", "gguf", fixture, "--out", folder])
    return folder


def random_tiny_llama(wide, work, python, layers, heads, kv_heads, head_dim):
    """A 256-wide LLaMA of `layers` layers with grouped KV heads, seeded random weights and
    `wide`'s tokenizer: with 80 layers llama.cpp's 70B type, whose attn_v llama-quantize treats
    apart; with 4 or more query heads per KV head, the grouping its Q2_K and IQ4 mixtures read."""
    folder = os.path.join(work, f"tiny-{layers}-layers-{heads}-{kv_heads}")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(wide):
        if name != "model.safetensors" and name != "config.json":
            shutil.copy(os.path.join(wide, name), folder)
    config = json.load(open(os.path.join(wide, "config.json")))
    config.update(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"), indent=1)
    run([python, "-c", MAKE_DEEP, folder])
    return folder


def random_tiny_qwen3(wide, work, python):
    """`wide` as a two-layer Qwen3 (llama.cpp's `qwen3`): head_dim 128 over 4 heads of a 256-wide model,
    so q and o are not square, and the per-head q/k norms, with seeded random weights."""
    folder = os.path.join(work, "tiny-qwen3-wide")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(wide):
        if name not in ("model.safetensors", "config.json"):
            shutil.copy(os.path.join(wide, name), folder)
    config = json.load(open(os.path.join(wide, "config.json")))
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, attention_bias=False, use_sliding_window=False)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"), indent=1)
    run([python, "-c", MAKE_DEEP, folder])
    return folder


MAKE_DEEP = """
import json, os, sys
import numpy as np
from safetensors.numpy import save_file
folder = sys.argv[1]
c = json.load(open(os.path.join(folder, "config.json")))
h, inter, kv, vocab = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"], c["vocab_size"]
q = c["num_attention_heads"] * c["head_dim"]
rng = np.random.default_rng(0)
draw = lambda *s: rng.standard_normal(s, dtype=np.float32) * 0.02
t = {"model.embed_tokens.weight": draw(vocab, h), "model.norm.weight": np.ones(h, np.float32), "lm_head.weight": draw(vocab, h)}
for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": np.ones(h, np.float32), p + "post_attention_layernorm.weight": np.ones(h, np.float32),
              p + "self_attn.q_proj.weight": draw(q, h), p + "self_attn.k_proj.weight": draw(kv, h), p + "self_attn.v_proj.weight": draw(kv, h),
              p + "self_attn.o_proj.weight": draw(h, q), p + "mlp.gate_proj.weight": draw(inter, h), p + "mlp.up_proj.weight": draw(inter, h),
              p + "mlp.down_proj.weight": draw(h, inter)})
    if c["model_type"] == "qwen3":
        t.update({p + "self_attn.q_norm.weight": 1 + draw(c["head_dim"]), p + "self_attn.k_norm.weight": 1 + draw(c["head_dim"])})
save_file(t, os.path.join(folder, "model.safetensors"))
"""


QUANTIZED_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s",
                   "q2_k", "iq4_xs", "iq4_nl", "iq3_m", "iq3_s", "tq2_0", "tq1_0", "q2_0", "q1_0")
# Written only with an importance matrix (llama-quantize refuses them without).
NEEDS_IMPORTANCE = ("q2_k_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")


def verify_k_quants(ember, models, work, examples, types=QUANTIZED_TYPES, with_importance=False):
    """(l): per model and type, one line: tensors whose type and bytes equal llama.cpp's quantizer
    on ember's f32 export, and both files' perplexity on `examples` (SmolLM2 only).
    `with_importance`: both quantize with the same synthetic importance matrix (`--imatrix`)."""
    import gguf
    import llama_cpp
    from llama_cpp import Llama
    lines = []
    for label, model in models.items():
        f32 = os.path.join(work, f"k-{os.path.basename(model)}-f32.gguf")
        pre = ["--pre", "gpt-2"] if "tiny" in label else []
        run([ember, "export", "gguf", "--base", model, "--out", f32, "--type", "f32", *pre])
        importance, imatrix = None, []
        if with_importance:
            path = os.path.join(work, f"k-{os.path.basename(model)}-imatrix.gguf")
            importance, imatrix = write_importance_matrix(f32, path), ["--imatrix", path]
            label = f"{label} with an importance matrix"
        # The types written only with a matrix, by both.
        for ty in (*types, *NEEDS_IMPORTANCE) if with_importance else types:
            ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ty.upper()}")
            ours, theirs = (os.path.join(work, f"k-{os.path.basename(model)}-{ty}-{who}.gguf") for who in ("ember", "llamacpp"))
            refusals = []
            try:
                run([ember, "export", "gguf", "--base", model, "--out", ours, "--type", ty, *pre, *imatrix])
            except subprocess.CalledProcessError as e:
                refusals.append(f"ember refused ({e.stderr.strip().splitlines()[-1]})")
            try:
                llama_quantize(f32, theirs, ftype, importance)
            except RuntimeError:
                refusals.append("llama.cpp's quantizer refused")
            if refusals:
                # Q1_0 has no type to fall back to: both must stop on rows that are not whole blocks.
                line = f"(l) {label} {ty}: {'; '.join(refusals)}; both refused: {len(refusals) == 2}"
                lines.append(line)
                print(line, flush=True)
                continue
            a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
            b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
            same_type = sum(a[n].tensor_type == b[n].tensor_type for n in b)
            same_bytes = sum(a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)) for n in b)
            kinds = {}
            for t in a.values():
                kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            differing = [n for n in b if a[n].tensor_type == b[n].tensor_type
                         and not np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8))]
            detail = ""
            if differing:
                n = differing[0]
                x, y = np.asarray(a[n].data).view(np.uint8).ravel(), np.asarray(b[n].data).view(np.uint8).ravel()
                detail = f"; first differing tensor {n}: {int((x != y).sum())} of {x.size} bytes differ"
            if with_importance and ty not in NEEDS_IMPORTANCE:
                # The matrix is seen to matter: tensors whose bytes differ from the plain export.
                plain = os.path.join(work, f"k-{os.path.basename(model)}-{ty}-plain.gguf")
                run([ember, "export", "gguf", "--base", model, "--out", plain, "--type", ty, *pre])
                c = {t.name: t for t in gguf.GGUFReader(plain).tensors}
                changed = sum(not np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(c[n].data).view(np.uint8)) for n in a)
                detail += f"; {changed} tensors differ from the export without it"
                os.remove(plain)
            line = (f"(l) {label} {ty}: ember wrote {dict(sorted(kinds.items()))} ({os.path.getsize(ours) / 1e6:.1f} MB, llama.cpp's {os.path.getsize(theirs) / 1e6:.1f} MB); "
                    f"same type as llama.cpp's quantizer {same_type}/{len(b)} tensors, same bytes {same_bytes}/{len(b)}{detail}")
            if label == "SmolLM2" and examples and not with_importance:
                ppl = []
                for path in (ours, theirs):
                    llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False)
                    ppl.append(perplexity(llm, examples))
                    del llm
                line += f"; perplexity (50 records) ember's file {ppl[0]:.4f}, llama.cpp's {ppl[1]:.4f}"
            lines.append(line)
            print(line, flush=True)
    return lines


MAKE_IMATRIX = """
import json, sys, numpy as np, torch, transformers
model_dir, data, out = sys.argv[1:4]
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
sums, counts = {}, {}
def hook(name):
    def f(module, inputs):
        x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]
    return f
for i, layer in enumerate(model.model.layers):
    for hf, g in names.items():
        module = layer.get_submodule(hf)
        module.register_forward_pre_hook(hook(f"blk.{i}.{g}.weight"))
tied = model.config.tie_word_embeddings
model.lm_head.register_forward_pre_hook(hook("token_embd.weight" if tied else "output.weight"))
records = json.load(open(data))[50:200]
with torch.no_grad():
    for r in records:
        text = r["instruction"] + ("\\n" + r["input"] if r.get("input") else "") + "\\n" + r["output"]
        ids = tok(text, return_tensors="pt").input_ids[:, :512]
        model(ids)
np.savez(out, **{name + ".in_sum2": sums[name].float().numpy().astype(np.float32) for name in sums},
         **{name + ".counts": np.array([counts[name]], dtype=np.float32) for name in sums})
print(f"{len(sums)} entries, {max(counts.values())} tokens")
"""


def verify_real_importance(args, ember, base, work, examples, types=("q6_k", "q4_k_m", "q4_0", "q3_k_m", "iq4_xs", "q2_k", "iq3_m", "iq3_xxs", "iq2_m", "iq1_m")):
    """(l): an importance matrix of SmolLM2's real activations (transformers, llama-imatrix's
    quantity: each linear input column's mean square over the tokens of Alpaca records 50-199,
    disjoint from the 50 evaluated): per type, perplexity without and with it, and whether
    llama.cpp's quantizer given the same matrix writes the same bytes."""
    import gguf
    import llama_cpp
    from llama_cpp import Llama
    activations = os.path.join(work, "smollm2-activations.npz")
    run([args.reference_python, "-c", MAKE_IMATRIX, base, args.data, activations])
    tensors = dict(np.load(activations))
    # In llama-imatrix's GGUF layout.
    imatrix = os.path.join(work, "smollm2-imatrix.gguf")
    writer = gguf.GGUFWriter(imatrix, "imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["alpaca records 50-199"])
    writer.add_uint32("imatrix.chunk_count", 150)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, values in sorted(tensors.items()):
        writer.add_tensor(name, values.reshape(1, -1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    importance = {n[:-8]: tensors[n] / np.float32(round(float(tensors[n[:-8] + ".counts"][0]))) for n in tensors if n.endswith(".in_sum2")}
    f32 = os.path.join(work, "smollm2-imatrix-f32.gguf")
    run([ember, "export", "gguf", "--base", base, "--out", f32, "--type", "f32"])
    lines = []
    for ty in types:
        ppl = {}
        ppl["without"] = float("nan")  # the types llama-quantize writes only with a matrix
        for label, extra in (("without", []), ("with", ["--imatrix", imatrix])):
            if label == "without" and ty in NEEDS_IMPORTANCE:
                continue
            path = os.path.join(work, f"imatrix-{ty}-{label}.gguf")
            run([ember, "export", "gguf", "--base", base, "--out", path, "--type", ty, *extra])
            llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False)
            ppl[label] = perplexity(llm, examples)
            del llm
        theirs = os.path.join(work, f"imatrix-{ty}-llamacpp.gguf")
        llama_quantize(f32, theirs, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ty.upper()}"), importance)
        a = {t.name: t for t in gguf.GGUFReader(os.path.join(work, f"imatrix-{ty}-with.gguf")).tensors}
        b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        same = sum(a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)) for n in b)
        line = (f"(l) SmolLM2 {ty} with an importance matrix of its activations on 150 other Alpaca records: perplexity (50 records) "
                f"{ppl['without']:.4f} without, {ppl['with']:.4f} with; same bytes as llama.cpp's quantizer given it {same}/{len(b)}")
        lines.append(line)
        print(line, flush=True)
    return lines


def imatrix_raw(path):
    """An importance matrix file's raw sums and counts by weight name, its chunk count and datasets."""
    import gguf
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).ravel() for t in reader.tensors}
    sums = {n[:-len(".in_sum2")]: v for n, v in tensors.items() if n.endswith(".in_sum2")}
    counts = {n[:-len(".counts")]: v.tolist() for n, v in tensors.items() if n.endswith(".counts")}
    field = lambda key: reader.fields[key]
    chunks = int(field("imatrix.chunk_count").parts[-1][0])
    datasets = [bytes(field("imatrix.datasets").parts[i]).decode() for i in field("imatrix.datasets").data]
    return sums, counts, chunks, datasets


def imatrix_means(path):
    """An importance matrix file's mean squares by weight name, its token counts and chunks."""
    import gguf
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    means = {n[: -len(".in_sum2")]: v / tensors[n.replace(".in_sum2", ".counts")][0] for n, v in tensors.items() if n.endswith(".in_sum2")}
    counts = sorted({int(v[0]) for n, v in tensors.items() if n.endswith(".counts")})
    return means, counts, int(reader.fields["imatrix.chunk_count"].parts[-1][0])


def verify_imatrix(args, ember, base, adapter, work, examples, types=("q4_k_m", "q3_k_m", "iq4_xs", "q2_k")):
    """(m): ember's importance matrix against llama-imatrix's, and the quantized files each makes."""
    from llama_cpp import Llama
    records = json.load(open(args.data))[50:200]
    text = os.path.join(work, "calibration.txt")
    with open(text, "w") as f:
        f.write("\n\n".join(r["instruction"] + ("\n" + r["input"] if r.get("input") else "") + "\n" + r["output"] for r in records))
    lines, matrices = [], {}
    for tag, label, extra in (("base", "SmolLM2", []), ("lora", "SmolLM2 with (b)'s LoRA merged", ["--adapter", adapter])):
        f32 = os.path.join(work, f"m-{tag}-f32.gguf")
        run([ember, "export", "gguf", "--base", base, *extra, "--out", f32, "--type", "f32"])
        ours = os.path.join(work, f"m-{tag}-ember.imatrix.gguf")
        run([ember, "imatrix", "--base", base, *extra, "--data", text, "--out", ours])
        ours_means, ours_counts, ours_chunks = imatrix_means(ours)
        # llama-imatrix one chunk per batch, KV cache in f32 (as ember's attention); then as it runs by default.
        agreement = []
        for setting, flags in (("1 chunk per batch, f32 KV cache", ["-b", "512", "-ctk", "f32", "-ctv", "f32"]), ("its defaults", [])):
            theirs = os.path.join(work, f"m-{tag}-llama-{len(flags)}.imatrix.gguf")
            run([args.llama_imatrix, "-m", f32, "-f", text, "-o", theirs, "-c", "512", "--no-ppl", "-t", str(os.cpu_count()), *flags])
            means, counts, chunks = imatrix_means(theirs)
            same_names = sorted(means) == sorted(ours_means)
            worst = max(float(np.abs(ours_means[n] - means[n]).max() / np.abs(means[n]).max()) for n in means) if same_names else float("nan")
            agreement.append(f"{setting}: same {len(means)} names {same_names}, tokens counted {counts} vs ember {ours_counts}, "
                             f"chunks {chunks} vs {ours_chunks}, mean squares max |diff| / entry max {worst:.1e}")
            matrices.setdefault(tag, {})[setting] = theirs
        line = f"(m) {label}: ember imatrix vs llama-imatrix on ember's f32 export, {len(records)} Alpaca records as text: " + "; ".join(agreement)
        lines.append(line)
        print(line, flush=True)
        matrices[tag]["ember"] = ours
    # The merged LoRA's own effect on the matrix, to set the agreement above against.
    base_means, lora_means = imatrix_means(matrices["base"]["ember"])[0], imatrix_means(matrices["lora"]["ember"])[0]
    shifts = sorted(float(np.abs(base_means[n] - lora_means[n]).max() / np.abs(base_means[n]).max()) for n in base_means)
    lines.append(f"(m) the LoRA moves ember's entries from the base's by up to {shifts[-1]:.2f} of the entry's max (median {shifts[len(shifts) // 2]:.3f})")
    # A q8_0 GGUF as the base (its blocks stay quantized), as llama-imatrix is usually run.
    q8 = os.path.join(work, "m-base-q8_0.gguf")
    run([ember, "export", "gguf", "--base", base, "--out", q8, "--type", "q8_0"])
    for who, command in (("ember", [ember, "imatrix", "--base", q8, "--data", text, "--out"]),
                         ("llama", [args.llama_imatrix, "-m", q8, "-f", text, "-c", "512", "--no-ppl", "-t", str(os.cpu_count()), "-b", "512", "-ctk", "f32", "-ctv", "f32", "-o"])):
        matrices.setdefault("q8_0", {})[who] = os.path.join(work, f"m-q8_0-{who}.imatrix.gguf")
        run([*command, matrices["q8_0"][who]])
    means = {who: imatrix_means(path)[0] for who, path in matrices["q8_0"].items()}
    f32_means = imatrix_means(matrices["base"]["ember"])[0]
    relative = lambda a, b: sorted(float(np.abs(a[n] - b[n]).max() / np.abs(b[n]).max()) for n in b)
    between, from_f32 = relative(means["ember"], means["llama"]), relative(means["ember"], f32_means)
    lines.append(f"(m) on ember's q8_0 file as the base: ember vs llama-imatrix max {between[-1]:.1e} (median {between[len(between) // 2]:.1e}; "
                 f"llama.cpp's q8_0 products round activations to 8 bits), ember's q8_0 vs f32 matrices max {from_f32[-1]:.1e}")
    print(lines[-1], flush=True)
    # --process-output on a model whose head is its own weight (SmolLM2's is tied).
    wide = wide_tiny_llama(ember, work)
    wide_f32 = os.path.join(work, "m-wide-f32.gguf")
    run([ember, "export", "gguf", "--base", wide, "--out", wide_f32, "--type", "f32", "--pre", "gpt-2"])
    ours, theirs = os.path.join(work, "m-wide-ember.imatrix.gguf"), os.path.join(work, "m-wide-llama.imatrix.gguf")
    run([ember, "imatrix", "--base", wide, "--data", text, "--out", ours, "--ctx", "128", "--process-output"])
    run([args.llama_imatrix, "-m", wide_f32, "-f", text, "-o", theirs, "-c", "128", "-b", "128", "-ctk", "f32", "-ctv", "f32", "--no-ppl", "--process-output"])
    (a, a_counts, _), (b, b_counts, _) = imatrix_means(ours), imatrix_means(theirs)
    worst = max(float(np.abs(a[n] - b[n]).max() / np.abs(b[n]).max()) for n in b) if sorted(a) == sorted(b) else float("nan")
    lines.append(f"(m) --process-output on the 256-wide tiny LLaMA (own head), chunks of 128: names {sorted(a) == sorted(b)} "
                 f"(output.weight in both: {'output.weight' in a and 'output.weight' in b}), tokens {a_counts} vs {b_counts}, max |diff| / entry max {worst:.1e}")
    print(lines[-1], flush=True)
    # --in-file: two matrices added up (ember's and llama-imatrix's of SmolLM2), by both.
    pair = [matrices["base"]["ember"], matrices["base"]["1 chunk per batch, f32 KV cache"]]
    ours, theirs = os.path.join(work, "m-sum-ember.imatrix.gguf"), os.path.join(work, "m-sum-llama.imatrix.gguf")
    run([ember, "imatrix", "--in-file", pair[0], "--in-file", pair[1], "--out", ours])
    # llama-imatrix wants a model even to add up, and the files comma-separated.
    run([args.llama_imatrix, "-m", os.path.join(work, "m-base-f32.gguf"), "--in-file", ",".join(pair), "-c", "512", "-o", theirs])
    a, b = imatrix_raw(ours), imatrix_raw(theirs)
    worst = max(float(np.abs(a[0][n] - b[0][n]).max() / np.abs(b[0][n]).max()) for n in b[0]) if sorted(a[0]) == sorted(b[0]) else float("nan")
    lines.append(f"(m) --in-file, ember's and llama-imatrix's SmolLM2 matrices added up by each: same names {sorted(a[0]) == sorted(b[0])}, "
                 f"counts equal {all(a[1][n] == b[1][n] for n in b[1])}, chunk count {a[2]} vs {b[2]}, datasets {a[3]} vs {b[3]}, "
                 f"sums max |diff| / entry max {worst:.1e}")
    print(lines[-1], flush=True)
    # The same sum in llama-imatrix's legacy layout (--output-format dat), byte for byte.
    ours, theirs = os.path.join(work, "m-sum-ember.dat"), os.path.join(work, "m-sum-llama.dat")
    run([ember, "imatrix", "--in-file", pair[0], "--in-file", pair[1], "--output-format", "dat", "--out", ours])
    run([args.llama_imatrix, "-m", os.path.join(work, "m-base-f32.gguf"), "--in-file", ",".join(pair), "-c", "512", "--output-format", "dat", "-o", theirs])
    lines.append(f"(m) --output-format dat of that sum: ember's file equals llama-imatrix's byte for byte: {open(ours, 'rb').read() == open(theirs, 'rb').read()}")
    print(lines[-1], flush=True)
    rendered = os.path.join(work, "calibration.json")
    json.dump(records, open(rendered, "w"))
    run([ember, "imatrix", "--base", base, "--data", rendered, "--out", os.path.join(work, "m-records.imatrix.gguf")])
    choices = (("without", None), ("llama-imatrix", matrices["base"]["1 chunk per batch, f32 KV cache"]), ("ember imatrix", matrices["base"]["ember"]),
               ("ember imatrix of the records rendered with the alpaca template", os.path.join(work, "m-records.imatrix.gguf")))
    for ty in types:
        ppl = []
        for label, matrix in choices:
            path = os.path.join(work, f"m-{ty}-{len(ppl)}.gguf")
            run([ember, "export", "gguf", "--base", base, "--out", path, "--type", ty, *(["--imatrix", matrix] if matrix else [])])
            llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False)
            ppl.append(f"{label} {perplexity(llm, examples):.4f}")
            del llm
        line = f"(m) SmolLM2 {ty}, perplexity (50 other records): " + ", ".join(ppl)
        lines.append(line)
        print(line, flush=True)
    return lines


def ember_prompt_ids(ember, gguf_path, text, dump):
    """The ids ember encodes `text` to with the GGUF file as its base (BOS first, if it adds one)."""
    run([ember, "generate", "--base", gguf_path, "--prompt", text, "--template", "none", "--max-new-tokens", "1", "--logits-out", dump])
    return json.load(open(dump))["prompt_ids"]


def verify_pre_tokenizers(ember, base, work):
    """(j): one report line per vocabulary: tiny_llama's 1,000 tokens, with multi-digit merges, and
    SmolLM2's 49k (q4_0: only the tokenizer matters), with word merges. Each line counts the texts
    on which the names give different ids, so that the check is seen to be sensitive."""
    from llama_cpp import Llama
    tiny_llama = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny_llama")
    lines = []
    for vocabulary, model, ty in (("tiny_llama", tiny_llama, "f32"), ("SmolLM2", base, "q4_0")):
        results, ids_by_text = [], {}
        for pre in ("gpt-2", "llama-bpe", "qwen2", "smaug-bpe", "deepseek-r1-qwen", "tekken", "deepseek-llm", "deepseek-coder",
                    "smollm", "mpt", "dbrx", "stablelm2", "bloom", "viking", "gpt-4o", "deepseek-v3", "spark2_5", "youtu", "falcon",
                    "jais-2", "tiny_aya", "bailingmoe", "seed-coder", "ufakzeka", "laguna", "exaone-moe", "minicpm5", "midm-2.0", "grok-2"):
            path = os.path.join(work, f"pre-{vocabulary}-{pre}.gguf")
            run([ember, "export", "gguf", "--base", model, "--out", path, "--type", ty, "--pre", pre])
            llm = Llama(model_path=path, n_ctx=256, vocab_only=True, verbose=False)
            equal = 0
            for i, text in enumerate(PRE_TEXTS):
                ours = ember_prompt_ids(ember, path, text, os.path.join(work, f"ember-j-{vocabulary}-{pre}-{i}.json"))
                theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
                ours = ours[1:] if ours and ours[0] == llm.token_bos() else ours
                equal += ours == theirs
                ids_by_text.setdefault(text, set()).add(tuple(theirs))
                print(f"(j) {vocabulary} {pre} {text!r}: ember {ours} | llama.cpp {theirs}")
            results.append(f"{pre} {equal}/{len(PRE_TEXTS)}")
            del llm
            os.remove(path)
        kinds = ", ".join(str(len(ids_by_text[t])) for t in PRE_TEXTS)
        lines.append(f"(j) GGUF byte-level BPE pre-tokenizers on {vocabulary}'s vocabulary, ember's ids equal llama.cpp's: {', '.join(results)} "
                     f"(distinct id lists per text across the names: {kinds})")
    return lines


SENTENCEPIECE_TEXTS = ["a <tool> call", "<tool>call", "x<tool><tool> y", "Hello world", " leading space", "你好，世界！",
                       "</s>after a control token", "emoji 🦙 and 𠀋"]


def verify_sentencepiece(ember, work):
    """(j): a SentencePiece vocabulary with a user-defined piece (the fixtures' sp_bpe model, on
    tiny_llama's weights): ember's GGUF tokenizer against llama.cpp's on the same file, control
    tokens parsed, user-defined pieces split out."""
    from llama_cpp import Llama
    from safetensors.numpy import load_file, save_file
    fixtures = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    folder = os.path.join(work, "tiny-sentencepiece")
    os.makedirs(folder, exist_ok=True)
    tensors = load_file(os.path.join(fixtures, "tiny_llama", "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = tensors[name]
        tensors[name] = np.concatenate([rows, np.zeros((2000 - rows.shape[0], rows.shape[1]), rows.dtype)])
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    config = json.load(open(os.path.join(fixtures, "tiny_llama", "config.json")))
    config["vocab_size"] = 2000
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    shutil.copy(os.path.join(fixtures, "tokenizers", "sp_bpe", "tokenizer.model"), folder)
    path = os.path.join(work, "tiny-sentencepiece.gguf")
    run([ember, "export", "gguf", "--base", folder, "--out", path, "--type", "f32"])
    llm = Llama(model_path=path, n_ctx=256, vocab_only=True, verbose=False)
    equal = 0
    for i, text in enumerate(SENTENCEPIECE_TEXTS):
        ours = ember_prompt_ids(ember, path, text, os.path.join(work, f"ember-j-sp-{i}.json"))
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        equal += ours == theirs
        print(f"(j) SentencePiece {text!r}: ember {ours} | llama.cpp {theirs}")
    del llm
    return (f"(j) a SentencePiece vocabulary with a user-defined piece (`<tool>`), as a GGUF base: ember's ids equal llama.cpp's "
            f"{equal}/{len(SENTENCEPIECE_TEXTS)}")


def verify_glm(args, ember, work):
    """(k): one report line per model."""
    from llama_cpp import Llama
    sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
    import gguf
    lines = []
    for kind, layout, reference_dir, targets in (
        ("chatglm3", "ChatGLM3 layout (fused query_key_value), SentencePiece", "chatglm3_6b", '["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]'),
        ("glm4", "HF-native glm, GLM-4 tiktoken", "glm4_9b_chat", '["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]'),
        ("glm4_0414", "GLM-4-0414 (Glm4ForCausalLM), GLM-4 tiktoken", "glm4_9b_chat", '["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]'),
    ):
        if args.glm_kinds and kind not in args.glm_kinds.split(","):
            continue
        # transformers' classes exist for both GLM-4 layouts; llama.cpp names GLM-4-0414 glm4.
        has_hf, arch, template = kind != "chatglm3", "glm4" if kind == "glm4_0414" else "chatglm", "glm4" if kind == "glm4_0414" else kind
        model = os.path.join(work, f"tiny_{kind}")
        run([args.reference_python, "-c", MAKE_GLM, model, args.tokenizers, kind])
        path = os.path.join(work, f"tiny-{kind}-f32.gguf")
        run([ember, "export", "gguf", "--base", model, "--out", path, "--type", "f32"])
        reader = gguf.GGUFReader(path)
        pre = reader.fields["tokenizer.ggml.pre"].contents()

        # Tokenization against the reference ids of THUDM's own tokenizers.
        reference = json.load(open(os.path.join(args.tokenizers, reference_dir, "reference.json")))
        cases = reference["sentencepiece"]["cases"] if "sentencepiece" in reference else reference["tiktoken"]["cases"]
        llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False)
        same_ids = 0
        for case in cases:
            want = case.get("ids", case.get("ids_ordinary"))
            got = llm.tokenize(case["text"].encode(), add_bos=False, special=False)
            same_ids += got == want
            if got != want:
                print(f"(k) {kind} {case['text']!r}: reference {want} | llama.cpp {got}")

        # Base model, then a LoRA trained by ember on it.
        run_dir = os.path.join(work, f"lora-{kind}")
        recipe = os.path.join(work, f"lora-{kind}.toml")
        open(recipe, "w").write(f'[model]\npath = "{model}"\n[adapter]\nmethod = "lora"\nr = 4\nalpha = 8\ntarget_modules = {targets}\n'
                                f'[data]\npath = "{os.path.abspath(args.data_zh)}"\ntemplate = "{template}"\ncutoff_len = 128\n'
                                f'[train]\nmax_steps = 10\nlr = 1e-2\nmicro_batch_size = 4\n[output]\ndir = "{run_dir}"\n')
        run([ember, "train", recipe, "--quiet", "--overwrite"])
        adapter = os.path.join(run_dir, "adapter")
        lora_gguf = os.path.join(work, f"lora-{kind}.gguf")
        run([ember, "export", "gguf-lora", "--base", model, "--adapter", adapter, "--out", lora_gguf])
        results = {}
        for with_adapter in (False, True):
            if with_adapter:
                llm = Llama(model_path=path, lora_path=lora_gguf, n_ctx=512, logits_all=True, verbose=False)
            equal, worst, worst_hf, changed = 0, 0.0, None, 0
            for i, prompt in enumerate(GLM_PROMPTS):
                dump = os.path.join(work, f"ember-k-{kind}-{with_adapter}-{i}.json")
                extra = ["--adapter", adapter] if with_adapter else []
                run([ember, "generate", "--base", model, *extra, "--prompt", prompt, "--template", template, "--max-new-tokens", "8", "--logits-out", dump])
                ours = json.load(open(dump))
                theirs, last = llama_answer(llm, ours["prompt_ids"], len(ours["answer_ids"]))
                same = theirs == ours["answer_ids"]
                worst = max(worst, float(np.abs(last - np.array(ours["last_logits"], dtype=np.float32)).max()))
                if with_adapter:
                    changed += ours["answer_ids"] != json.load(open(os.path.join(work, f"ember-k-{kind}-False-{i}.json")))["answer_ids"]
                elif has_hf:
                    hf = json.loads(run([args.reference_python, "-c", HF_ANSWER, model, json.dumps(ours["prompt_ids"]), str(len(ours["answer_ids"]))]))
                    hf_last = np.array(hf["last_logits"], dtype=np.float32)
                    ours_hf, theirs_hf = worst_hf or (0.0, 0.0)
                    worst_hf = (max(ours_hf, float(np.abs(np.array(ours["last_logits"], dtype=np.float32) - hf_last).max())), max(theirs_hf, float(np.abs(last - hf_last).max())))
                    same = same and hf["answer_ids"] == ours["answer_ids"]
                equal += same
                print(f"(k) {kind} adapter {with_adapter} {prompt!r}: ember {ours['answer_ids']} | llama.cpp {theirs}")
            results[with_adapter] = (equal, worst, worst_hf, changed)
            del llm
        # The adapter merged into the export instead (`export gguf --adapter`).
        merged = os.path.join(work, f"tiny-{kind}-merged-f32.gguf")
        run([ember, "export", "gguf", "--base", model, "--adapter", adapter, "--out", merged, "--type", "f32"])
        llm = Llama(model_path=merged, n_ctx=512, logits_all=True, verbose=False)
        m_eq = 0
        for i in range(len(GLM_PROMPTS)):
            ours = json.load(open(os.path.join(work, f"ember-k-{kind}-True-{i}.json")))
            m_eq += llama_answer(llm, ours["prompt_ids"], len(ours["answer_ids"]))[0] == ours["answer_ids"]
        del llm
        # Back: `ember import gguf` returns the weights bit for bit.
        back = os.path.join(work, f"imported-{kind}")
        run([ember, "import", "gguf", path, "--out", back])
        original, imported = safetensors_read(os.path.join(model, "model.safetensors")), safetensors_read(os.path.join(back, "model.safetensors"))
        round_trip = sorted(original) == sorted(imported) and all(np.array_equal(original[k], imported[k]) for k in original)

        # Train on the file llama.cpp runs: quantized by its own quantizer, a LoRA trained by ember
        # on the blocks, applied by llama.cpp to the same file.
        import llama_cpp
        quantized = os.path.join(work, f"tiny-{kind}-q4_k_m.gguf")
        llama_quantize(path, quantized, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
        kinds = {}
        for t in gguf.GGUFReader(quantized).tensors:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
        q_run = os.path.join(work, f"lora-{kind}-on-q4_k_m")
        run([ember, "train", recipe, "--quiet", "--overwrite", "--set", f'model.path="{quantized}"', "--set", f'output.dir="{q_run}"'])
        q_lora = os.path.join(work, f"lora-{kind}-on-q4_k_m.gguf")
        run([ember, "export", "gguf-lora", "--base", quantized, "--adapter", os.path.join(q_run, "adapter"), "--out", q_lora])
        llm = Llama(model_path=quantized, lora_path=q_lora, n_ctx=512, logits_all=True, verbose=False)
        q_eq, q_worst = 0, 0.0
        for i, prompt in enumerate(GLM_PROMPTS):
            dump = os.path.join(work, f"ember-k-{kind}-q-{i}.json")
            run([ember, "generate", "--base", quantized, "--adapter", os.path.join(q_run, "adapter"), "--prompt", prompt, "--template", template, "--max-new-tokens", "8", "--logits-out", dump])
            ours = json.load(open(dump))
            theirs, last = llama_answer(llm, ours["prompt_ids"], len(ours["answer_ids"]))
            q_eq += theirs == ours["answer_ids"]
            q_worst = max(q_worst, float(np.abs(last - np.array(ours["last_logits"], dtype=np.float32)).max()))
        del llm
        (b_eq, b_worst, b_hf, _), (a_eq, a_worst, _, a_changed) = results[False], results[True]
        hf_part = f"; to transformers: ember {b_hf[0]:.2e}, llama.cpp {b_hf[1]:.2e}" if b_hf is not None else ""
        line = (f"(k) {kind}: {layout} -> {arch}, pre '{pre}': llama.cpp's ids equal the reference tokenizer's on {same_ids}/{len(cases)} texts; "
                f"greedy answers (8 tokens, {kind} chat prompts) equal {b_eq}/{len(GLM_PROMPTS)}{' on all three' if has_hf else ''}, last-position logits max |diff| {b_worst:.2e}{hf_part}; "
                f"LoRA trained by ember (10 steps) via --lora: answers equal {a_eq}/{len(GLM_PROMPTS)} (changed by the adapter {a_changed}/{len(GLM_PROMPTS)}), logits max |diff| {a_worst:.2e}; "
                f"merged into the export: answers equal {m_eq}/{len(GLM_PROMPTS)}; import gguf bit for bit: {round_trip}; "
                f"llama.cpp's Q4_K_M of it ({dict(sorted(kinds.items()))}) as ember's base, LoRA trained on its blocks, via --lora: "
                f"answers equal {q_eq}/{len(GLM_PROMPTS)}, logits max |diff| {q_worst:.3f}")

        if has_hf:
            # llama.cpp's own converter on the same model, given ember's tokenizer.json of the ranks
            # (its GLM-4 tiktoken path needs THUDM's remote-code tokenizer).
            hf_dir = os.path.join(work, f"tiny_{kind}_tokenizer_json")
            run([ember, "import", "tokenizer", model, "--out", hf_dir])
            for f in ("config.json", "model.safetensors"):
                if not os.path.exists(os.path.join(hf_dir, f)):
                    os.symlink(os.path.join(model, f), os.path.join(hf_dir, f))
            open(os.path.join(hf_dir, "tokenizer_config.json"), "w").write('{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}')
            theirs_path = os.path.join(work, f"tiny-{kind}-convert.gguf")
            env = dict(os.environ, PYTHONPATH=os.path.join(args.llama_cpp, "gguf-py"))
            run([args.reference_python, os.path.join(args.llama_cpp, "convert_hf_to_gguf.py"), hf_dir, "--outtype", "f32", "--outfile", theirs_path], env=env)
            theirs_r = gguf.GGUFReader(theirs_path)
            ot = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
            tt = {t.name: np.array(t.data, dtype=np.float32) for t in theirs_r.tensors}
            exact = sorted(ot) == sorted(tt) and all(np.array_equal(ot[k], tt[k]) for k in ot)
            fields = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF") and k != "general.name"}
            fo, ft = fields(reader), fields(theirs_r)
            differ = sorted(k for k in set(fo) | set(ft) if fo.get(k) != ft.get(k))
            shown = "; ".join(f"{k}: ember {fo.get(k)!r}, converter {ft.get(k)!r}" for k in differ)
            line += f"; against convert_hf_to_gguf.py: {len(ot)} tensors bit for bit: {exact}; metadata keys that differ: {shown or 'none'}"
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
