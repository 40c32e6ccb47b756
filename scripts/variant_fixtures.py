#!/usr/bin/env python3
"""Fixture roots in the shared format with configurations and adapter options the shared root does not
have, for the parity harness (`EMBER_FIXTURES=<out> cargo test --release --test parity`): a stand-in
for the held-out roots, which hold cases no session has seen. Every model is made by the shared
generator's own functions (`../shared/fixtures/gen.py`, `gen_wave2.py`), so the files follow the
contract exactly; only the configurations and PEFT options differ.

A developer tool (torch, transformers, peft, bitsandbytes; see tests/fixtures/requirements.txt).
Usage: python scripts/variant_fixtures.py --out DIR [--shared ../shared/fixtures] [--only A,B] [--chatglm-src DIR]
  --only: comma-separated case folders (default: every case)
  --chatglm-src: configuration_chatglm.py + modeling_chatglm.py of THUDM/chatglm3-6b (see
  tests/fixtures/README.md); without it the ChatGLM variants are left out.

Each case is one folder; a folder the reference cannot build is reported and left out. What ember
cannot run must come out of the harness as SKIP with its reason, never FAIL or a crash.
"""
import argparse
import copy
import os
import shutil
import sys
import tempfile

# gen.py needs a fixed hash seed (PEFT writes target_modules from a set) and re-executes itself
# without this script's arguments otherwise.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--shared", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures"))
ap.add_argument("--chatglm-src", default=None)
ap.add_argument("--only", default=None, help="comma-separated case folders to write (default: all)")
ARGS = ap.parse_args()
if ARGS.chatglm_src:
    # gen.py imports the remote code as a package from $FIXTURE_WORKDIR/src/chatglm3.
    work = tempfile.mkdtemp()
    os.makedirs(f"{work}/src/chatglm3")
    for f in ("configuration_chatglm.py", "modeling_chatglm.py"):
        shutil.copy(os.path.join(ARGS.chatglm_src, f), f"{work}/src/chatglm3/{f}")
    open(f"{work}/src/chatglm3/__init__.py", "w").close()
    os.environ["FIXTURE_WORKDIR"] = work
sys.path.insert(0, os.path.abspath(ARGS.shared))
saved_argv, sys.argv = sys.argv, [sys.argv[0]]
import gen  # noqa: E402  (re-executes itself with PYTHONHASHSEED=0, as gen.py does)
import gen_wave2  # noqa: E402
sys.argv = saved_argv

from peft import (AdaptionPromptConfig, IA3Config, LoraConfig, PrefixTuningConfig,  # noqa: E402
                  PromptTuningConfig)
from transformers import (AutoTokenizer, Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

gen.setup(["--threads", "2", "--attn", "eager"])
OUT = os.path.abspath(ARGS.out)
os.makedirs(OUT, exist_ok=True)
TOK = os.path.join(OUT, ".tokenizer")
TEXTS = ["Give three tips for staying healthy.", "你好，世界！请介绍一下你自己。", "Hello"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = QKVO + ["gate_proj", "up_proj", "down_proj"]
CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
BASE = dict(vocab_size=3072, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=512,
            pad_token_id=None)


def rope(kind="default", theta=10000.0, **kw):
    return {"rope_parameters": dict(rope_type=kind, rope_theta=theta, **kw)}


def tok_builder(out_dir):
    """One Llama-3-like byte-level BPE (3,000 merges, trained by gen.py) shared by every case."""
    if not os.path.isdir(TOK):
        gen.build_llama3_like_tokenizer(TOK)
    for f in os.listdir(TOK):
        shutil.copy(os.path.join(TOK, f), out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


# A method: (name, PEFT config, seed, with loss and gradients); gen.py merges the ones named lora*.
def lora(name, seed, **kw):
    return (name, LoraConfig(task_type="CAUSAL_LM", **{"r": 4, "lora_alpha": 8, **kw}), seed, True)


BASIC = [lora("lora", 101, target_modules=ALL),
         ("prefix", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6), 201, True)]
ADAPTION = [("adaption_l2", AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2), 302, True)]
OPTIONS = [
    lora("lora_dropout", 112, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    lora("lora_pattern", 111, r=8, lora_alpha=16, target_modules=ALL, rank_pattern={"q_proj": 4, "down_proj": 2},
         alpha_pattern={"v_proj": 32}, layers_to_transform=[0, 1]),
    lora("lora_regex", 121, target_modules=r".*\.(q|v)_proj"),
    lora("lora_all_linear", 122, target_modules="all-linear"),
    lora("lora_embed", 123, target_modules=["embed_tokens", "q_proj"]),
    lora("lora_lm_head", 124, target_modules=["lm_head", "v_proj"]),
    lora("bias_lora_only", 113, target_modules=QKVO, bias="lora_only"),    # no bias in these models: nothing more trains
    lora("lora_exclude", 128, target_modules="all-linear", exclude_modules=["o_proj", "model.layers.0.mlp.down_proj"]),
    lora("lora_exclude_regex", 129, target_modules=QKVO, exclude_modules=r".*\.0\.self_attn\.(k|v)_proj"),
    ("ia3_exclude", IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"], exclude_modules=["model.layers.1.mlp.down_proj"]),
     523, True),
    lora("lora_tokens", 130, target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 17, 250]),
    lora("lora_save_head", 126, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    lora("dora_layers", 127, use_dora=True, use_rslora=True, target_modules=["o_proj", "down_proj"],
         layers_to_transform=[0]),
    ("ia3_gate", IA3Config(task_type="CAUSAL_LM", target_modules=["gate_proj", "up_proj", "o_proj"],
                           feedforward_modules=["gate_proj"]), 521, True),
    ("prefix_small", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                        encoder_hidden_size=24), 221, True),
]
# Qwen2's q/k/v biases trained (PEFT `bias`), and a bias on B (`lora_bias`; PEFT cannot merge it where the base
# has no bias, so that case is not named lora*).
BIASES = [lora("lora_bias_all", 131, target_modules=["q_proj", "v_proj", "o_proj"], layers_to_transform=[1], bias="all"),
          lora("lora_bias_only", 132, target_modules=["q_proj", "k_proj", "down_proj"], bias="lora_only"),
          lora("lora_bias", 133, target_modules=["q_proj", "v_proj"], lora_bias=True, lora_dropout=0.1),
          ("unmergeable_lora_bias", LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_bias=True,
                                               target_modules=["o_proj", "down_proj"]), 134, True),
          ("dora_bias", LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True, bias="all",
                                   target_modules=["q_proj", "v_proj"]), 135, True)]
# (folder, family, config changes, methods, wave 2 (DoRA, (IA)^3, prompt tuning, QLoRA NF4 on these targets))
CASES = [
    ("llama3_tied", "llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                                  head_dim=48, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                  **rope("llama3", 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=16)),
     BASIC + ADAPTION, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    ("qwen2_tied", "qwen2", dict(tie_word_embeddings=True, **rope(theta=1e6)), BASIC + OPTIONS[:3], ALL),
    ("qwen2_tied_vocab", "qwen2", dict(tie_word_embeddings=True, **rope(theta=1e6)),
     [lora("lora_embed", 123, target_modules=["embed_tokens", "q_proj"]), lora("lora_lm_head", 124, target_modules=["lm_head", "v_proj"]),
      lora("lora_tokens", 130, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": [3, 17, 250]})],
     None),
    ("qwen3_yarn", "qwen3", dict(head_dim=32, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                 **rope("yarn", 1e6, factor=4.0, original_max_position_embeddings=64)),
     BASIC + OPTIONS[:3], ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    ("llama_options", "llama", dict(num_key_value_heads=1, **rope()), BASIC + OPTIONS, None),
    ("rope_linear", "llama", rope("linear", factor=4.0), BASIC + ADAPTION, None),
    ("rope_yarn", "llama", rope("yarn", factor=4.0, original_max_position_embeddings=128), BASIC, None),
    ("rope_yarn_options", "llama", rope("yarn", 500000.0, factor=8.0, original_max_position_embeddings=64, beta_fast=16,
                                        beta_slow=2, mscale=0.7, mscale_all_dim=1.0, truncate=False), BASIC, None),
    ("qwen2_yarn", "qwen2", rope("yarn", 1e6, factor=4.0, original_max_position_embeddings=32, attention_factor=1.3),
     BASIC, None),
    ("mlp_bias", "llama", dict(mlp_bias=True, attention_bias=True, **rope()), BASIC + ADAPTION, None),
    ("mistral", "mistral", dict(sliding_window=None, **rope()), BASIC + ADAPTION, None),
    ("mistral_long_window", "mistral", dict(sliding_window=4096, **rope()), BASIC, None),
    ("mistral_nemo_heads", "mistral", dict(head_dim=32, sliding_window=None, **rope(theta=1e6)), BASIC, ALL),
    ("mistral_short_window", "mistral", dict(sliding_window=4, **rope()), BASIC + ADAPTION, ALL),
    ("qwen2_window", "qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0, **rope()),
     BASIC, None),
    ("qwen2_window_upper", "qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1, **rope()),
     BASIC + OPTIONS[:1], ["q_proj", "v_proj"]),
    ("qwen2_biases", "qwen2", dict(**rope()), BIASES, None),
    ("gelu", "llama", dict(hidden_act="gelu_pytorch_tanh", **rope()), BASIC, None),
    ("gelu_exact", "llama", dict(hidden_act="gelu", mlp_bias=True, **rope()), BASIC + ADAPTION, ALL),
    # LongRoPE with the long factors from 9 positions on (every batch here is longer), and with the short ones
    # (a context of 64); Phi-3's default attention factor from max_position_embeddings / original.
    ("rope_longrope", "llama", dict(max_position_embeddings=64, **rope(
        "longrope", original_max_position_embeddings=8, short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
        long_factor=[1.0, 1.5, 2.2, 3.4, 5.0, 7.5, 11.0, 16.0])), BASIC + ADAPTION, ALL),
    ("rope_longrope_short", "llama", dict(max_position_embeddings=256, **rope(
        "longrope", original_max_position_embeddings=64, attention_factor=1.2,
        short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8], long_factor=[4.0] * 8)), BASIC, None),
    ("rope_dynamic", "llama", dict(max_position_embeddings=16, **rope("dynamic", factor=2.0)), BASIC + ADAPTION, ALL),
]


def wave2_spec(qlora_targets):
    return {"dora": (LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=ALL, use_dora=True,
                                use_rslora=True), 402),
            "ia3": (IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                              feedforward_modules=["up_proj", "down_proj"]), 502),
            "prompt_tuning": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), 602),
            "qlora": (LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=qlora_targets), 702),
            "lean": []}


def buildable(family, cfg, methods):
    """The methods the reference can build on this model (PEFT refuses some combinations)."""
    ok = []
    for m in methods:
        try:
            gen.llama_fixture("probe", os.path.join(OUT, ".probe"), cfg, tok_builder, TEXTS, 40, copy.deepcopy([m]), 99,
                              None)
            ok.append(m)
        except Exception as e:  # noqa: BLE001
            print(f"[{family}] {m[0]}: the reference cannot build it ({e!r:.160})", flush=True)
    return ok


ONLY = set(ARGS.only.split(",")) if ARGS.only else None


def wanted(tag):
    return ONLY is None or tag in ONLY


for tag, family, change, methods, qlora_targets in filter(lambda case: wanted(case[0]), CASES):
    gen.LlamaConfig, gen.LlamaForCausalLM = CLASSES[family]
    cfg = dict(BASE, **change)
    try:
        ms = buildable(tag, cfg, methods)
        # PEFT fills a prompt-learning config in with the first model's shapes: a fresh copy each.
        gen.llama_fixture(tag, os.path.join(OUT, tag), cfg, tok_builder, TEXTS, 40, copy.deepcopy(ms), 99,
                          "lora" if any(m[0] == "lora" for m in ms) else None)
        if qlora_targets:
            gen_wave2.wave2_folder(os.path.join(OUT, tag), tag, wave2_spec(qlora_targets), full=True)
    except Exception as e:  # noqa: BLE001
        print(f"[{tag}] left out: {e!r:.300}", flush=True)

# GLM (transformers' GlmForCausalLM): full rotary, MQA, tied, no bias; and GLM-4-0414 (Glm4ForCausalLM,
# norms on the attention's and the MLP's output) with the same changes; and GLM's own half rotary with YaRN.
GLM_VARIANT = dict(num_attention_heads=8, num_key_value_heads=1, head_dim=8, partial_rotary_factor=1.0,
                   attention_bias=False, tie_word_embeddings=True, rope_theta=500000.0)
GLM_YARN = dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                     original_max_position_embeddings=16, partial_rotary_factor=0.5))
for tag, config_class, model_class, change in [("glm_variant", GlmConfig, GlmForCausalLM, GLM_VARIANT),
                                               ("glm4_variant", Glm4Config, Glm4ForCausalLM, GLM_VARIANT),
                                               ("glm_yarn", GlmConfig, GlmForCausalLM, GLM_YARN)]:
    if not wanted(tag):
        continue
    gen.GlmConfig = lambda config_class=config_class, change=change, **kw: config_class(**dict(kw, **change))
    gen.GlmForCausalLM = model_class
    gen.glm_fixture(tag, os.path.join(OUT, tag), TEXTS, 4242)

if ARGS.chatglm_src:
    chatglm = dict(num_layers=2, padded_vocab_size=2048, hidden_size=64, ffn_hidden_size=128, kv_channels=16,
                   num_attention_heads=4, seq_length=256, hidden_dropout=0.0, attention_dropout=0.0,
                   layernorm_epsilon=1e-5, rmsnorm=True, apply_residual_connection_post_layernorm=False,
                   post_layer_norm=True, add_bias_linear=False, add_qkv_bias=True, bias_dropout_fusion=True,
                   multi_query_attention=True, multi_query_group_num=2, apply_query_key_layer_scaling=True,
                   attention_softmax_in_fp32=True, fp32_residual_connection=False, quantization_bit=0,
                   original_rope=True, prefix_projection=False, tie_word_embeddings=False)
    for tag, change in [("chatglm_group1", dict(multi_query_group_num=1, kv_channels=32, num_attention_heads=2)),
                        ("chatglm_bias_linear", dict(add_bias_linear=True))]:
        if not wanted(tag):
            continue
        gen.chatglm_fixture(tag, os.path.join(OUT, tag), dict(chatglm, **change), TEXTS, 5678, 401,
                            gen.build_glm_tokenizer)

for scratch in (TOK, os.path.join(OUT, ".probe")):
    shutil.rmtree(scratch, ignore_errors=True)
print(f"wrote {OUT}", flush=True)
