#!/usr/bin/env bash
# Side by side on one NVIDIA GPU: HF PEFT (shared/bench/peft_reference.py) and `ember bench`,
# same workload, on a LLaMA-7B-shaped model with random bf16 weights (no checkpoint needed).
# Runs where python3 has torch + transformers + peft and the ember binary was built with
# `--features tch` against that torch (scripts/libtorch.sh cuda <version>).
#
#   scripts/bench-gpu.sh <ember binary> <tokenizer dir> <alpaca json> <peft_reference.py> <out dir>
#
# The model gets the tokenizer's vocabulary (SmolLM2's 49,152 tokens: no LLaMA tokenizer is
# bundled), otherwise LLaMA-7B's shape: 32 layers, hidden 4096, ffn 11008, 32 heads. It is made
# once, with transformers, only for a job that reads it: with SYNTHETIC=1 ember's jobs draw the
# same shape themselves (`ember bench --synthetic llama-7b`), which skips that step.
# Each run's peak GPU memory and utilization are sampled with nvidia-smi (whole process, CUDA
# context included); PEFT also reports torch.cuda.max_memory_allocated. JOBS picks and orders the
# runs (names in the case below); each is stopped after JOB_TIMEOUT seconds (default 300) so one
# hang cannot eat a lease; none starts after DEADLINE (seconds since the epoch). EMBER_FUSED reaches ember's jobs
# as it is (see models/src/fused/mod.rs); `ember-unfused` sets it to 0, `ember-fused` to 1.
set -uo pipefail
ember=$1 tok=$2 data=$3 reference=$4 out=$5
model=${MODEL_DIR:-/tmp/llama7b-random}
steps=${STEPS:-10}
mkdir -p "$out"
LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'

# The random model folder, made on first use.
make_model() {
  [ -f "$model/config.json" ] && return
  python3 - "$model" "$tok" <<'PY'
import sys, shutil, glob, torch, transformers
out, tok = sys.argv[1], sys.argv[2]
t = transformers.AutoTokenizer.from_pretrained(tok)
cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=len(t), rms_norm_eps=1e-5, max_position_embeddings=4096,
    bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("cuda"):
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(out)
for f in glob.glob(tok + "/tokenizer*") + glob.glob(tok + "/special_tokens_map.json"):
    shutil.copy(f, out)
print("random model:", sum(p.numel() for p in m.parameters()), "parameters in", out)
PY
  # The 13.5 GB just written would otherwise be flushed to disk during the next timed job: PEFT
  # right after this step ran at 689-705 tokens/s, with the folder already there at 1,572-1,920.
  sync
}

# run <name> <command...>: the command's JSON line, the sampled peak memory and the mean GPU
# utilization (share of time a kernel ran) over the job's last 10 s, which are its timed steps.
run() {
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$out/$name.mem" &
  local sampler=$!
  timeout "${JOB_TIMEOUT:-300}" "$@" > "$out/$name.json" 2> "$out/$name.err"
  local rc=$?
  kill $sampler; wait $sampler 2>/dev/null
  local peak util
  peak=$(cut -d, -f1 "$out/$name.mem" | sort -n | tail -1)
  util=$(tail -100 "$out/$name.mem" | awk -F', *' '{s += $2; n++} END {if (n) printf "%.0f", s / n}')
  echo "$name rc=$rc peak_nvidia_smi_mib=$peak gpu_util_last10s=$util% $(tail -1 "$out/$name.json")"
  [ $rc -eq 0 ] || tail -3 "$out/$name.err"
}
# ember's model: the folder, or its shape drawn by ember.
ember_model() {
  if [ "${SYNTHETIC:-0}" = 1 ]; then echo --synthetic llama-7b --tokenizer "$tok"; else make_model >&2; echo --model "$model"; fi
}
lora=(--r 16 --alpha 32 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --batch 4 --cutoff 512 --steps "$steps" --warmup 3)
for job in ${JOBS:-peft peft-ckpt ember ember-ckpt}; do
  if [ -n "${DEADLINE:-}" ] && [ "$(date +%s)" -ge "$DEADLINE" ]; then echo "$job skipped: past DEADLINE"; continue; fi
  case $job in peft*) make_model ;; *) read -ra source <<< "$(ember_model)" ;; esac
  case $job in
    peft) run peft python3 "$reference" --model "$model" --data "$data" --method lora "${lora[@]}" --device cuda ;;
    peft-ckpt) run peft-ckpt python3 "$reference" --model "$model" --data "$data" --method lora "${lora[@]}" --device cuda --grad-ckpt ;;
    ember) run ember "$ember" bench "${source[@]}" --data "$data" --method lora "${lora[@]}" --device cuda --dtype checkpoint ;;
    # The same with a wait after the backward pass and the optimizer: where a step's time goes.
    ember-phases) run ember-phases "$ember" bench "${source[@]}" --data "$data" --method lora "${lora[@]}" --device cuda --dtype checkpoint --phase-times ;;
    # LibTorch's fused ops are on by default: `ember-unfused` turns them off, `ember-fused` all on,
    # `ember-fused-attention` or `ember-fused-rms_norm,rope` only those named.
    ember-fused) EMBER_FUSED=1 run ember-fused "$ember" bench "${source[@]}" --data "$data" --method lora "${lora[@]}" --device cuda --dtype checkpoint ;;
    ember-fused-*) EMBER_FUSED=${job#ember-fused-} run "$job" "$ember" bench "${source[@]}" --data "$data" --method lora "${lora[@]}" --device cuda --dtype checkpoint ;;
    ember-unfused) EMBER_FUSED=0 run ember-unfused "$ember" bench "${source[@]}" --data "$data" --method lora "${lora[@]}" --device cuda --dtype checkpoint ;;
    ember-padded) run ember-padded "$ember" bench "${source[@]}" --data "$data" --method lora "${lora[@]}" --device cuda --dtype checkpoint --padded ;;
    ember-ckpt) run ember-ckpt "$ember" bench "${source[@]}" --data "$data" --method lora "${lora[@]}" --device cuda --dtype checkpoint \
      --gradient-checkpointing --loss-chunk-tokens 1024 ;;
    # QLoRA as recipes/qlora-7b.toml trains it: NF4 base with double quantization, checkpointing.
    # PEFT's side needs bitsandbytes. Where the image lacks it, a folder on PYTHONPATH with the
    # wheel's python files, its dist-info and the one libbitsandbytes_cuda<ver>.so the torch needs
    # (4.5 MB for 0.50.2 and CUDA 13.0) is enough.
    ember-nf4) run ember-nf4 "$ember" bench "${source[@]}" --data "$data" --method lora "${lora[@]}" --device cuda --dtype checkpoint \
      --quantize nf4 --double-quant --gradient-checkpointing --loss-chunk-tokens 1024 ;;
    peft-nf4) run peft-nf4 python3 "$reference" --model "$model" --data "$data" --method lora "${lora[@]}" --device cuda \
      --load-in-4bit --double-quant --grad-ckpt ;;
    peft-prefix) run peft-prefix python3 "$reference" --model "$model" --data "$data" --method prefix --batch 4 --cutoff 512 --steps "$steps" --device cuda ;;
    ember-prefix) run ember-prefix "$ember" bench "${source[@]}" --data "$data" --method prefix --batch 4 --cutoff 512 --steps "$steps" --device cuda --dtype checkpoint ;;
    ember-prefix-ckpt) run ember-prefix-ckpt "$ember" bench "${source[@]}" --data "$data" --method prefix --batch 4 --cutoff 512 --steps "$steps" --device cuda --dtype checkpoint \
      --gradient-checkpointing --loss-chunk-tokens 1024 ;;
    peft-adaption) run peft-adaption python3 "$reference" --model "$model" --data "$data" --method adaption --batch 4 --cutoff 512 --steps "$steps" --device cuda ;;
    ember-adaption) run ember-adaption "$ember" bench "${source[@]}" --data "$data" --method adaption --batch 4 --cutoff 512 --steps "$steps" --device cuda --dtype checkpoint ;;
  esac
done
