#!/usr/bin/env bash
# Self-distillation on slime: start a Ray head on this node and submit one training job.
#
#   SLIME_ROOT=/path/to/slime MODEL_NAME=qwen3-4B HF_CHECKPOINT=/models/Qwen3-4B \
#   REF_LOAD=/models/Qwen3-4B_torch_dist SAVE=/ckpt/qwen3-4B-sdft PROMPT_DATA=/data/train.jsonl \
#   RM_TYPE=math SELF_DISTILL_CONFIG=configs/sdft_topk.yaml \
#   bash run_self_distill_slime.sh [extra slime / --self-distill-* arguments...]
#
# Offline top-K distillation (README "Offline top-K distillation"): OFFLINE_TOPK=<extract_teacher_topk's
# teacher_topk.parquet> instead of PROMPT_DATA and RM_TYPE; slime's SFT loop over the data file beside it, without
# SGLang (SELF_DISTILL_CONFIG defaults to configs/offline_topk_kd.yaml).
#
# Every setting is an environment variable (defaults below); arguments after the script name are appended to the
# training command and win over the defaults here (e.g. --lr 2e-6). Self-distillation settings come from
# SELF_DISTILL_CONFIG (one of configs/*.yaml, passed as slime's --custom-config-path); a --self-distill-* flag given
# here wins over that file's key (the launcher warns and sets it back after slime applies the file).
# Arguments are validated with slime's parser before Ray is started (SKIP_PRECHECK=1 skips that).
# Multi-node: start this on the head node with ACTOR_NUM_NODES=N, and join the other nodes with
#   ray start --address "$MASTER_ADDR:6379" --num-gpus <gpus per node>
# before the job is submitted (WAIT_FOR_NODES=1 makes this script wait until all N nodes have joined).
set -euo pipefail

PROJECT_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" &>/dev/null && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # Ray would otherwise buffer the job's stdout/stderr

# ------------------------------------------------------------------ where things are
# Megatron-LM checkout providing megatron.training (slime's Docker image keeps it at /root/Megatron-LM).
MEGATRON_LM_PATH="${MEGATRON_LM_PATH:-/root/Megatron-LM}"
export PYTHONPATH="${PROJECT_ROOT}:${MEGATRON_LM_PATH}${PYTHONPATH:+:${PYTHONPATH}}"
# slime's checkout: $SLIME_ROOT, else the parent of the importable slime package (same rule as the launcher).
if [[ -z "${SLIME_ROOT:-}" ]]; then
  SLIME_ROOT="$("${PYTHON}" -m slime_self_distill.train --print-slime-root)" || {
    echo "set SLIME_ROOT to slime's checkout (the directory holding train.py), or pip install -e it" >&2
    exit 1
  }
fi
export PYTHONPATH="${PYTHONPATH}:${SLIME_ROOT}"

# ------------------------------------------------------------------ model and checkpoints
# MODEL_ARGS_SCRIPT defines the MODEL_ARGS array (slime ships one per model under scripts/models/).
if [[ -z "${MODEL_ARGS_SCRIPT:-}" ]]; then
  : "${MODEL_NAME:?set MODEL_NAME (a file of \$SLIME_ROOT/scripts/models without .sh, e.g. qwen3-4B) or MODEL_ARGS_SCRIPT}"
  MODEL_ARGS_SCRIPT="${SLIME_ROOT}/scripts/models/${MODEL_NAME}.sh"
fi
[[ -f "${MODEL_ARGS_SCRIPT}" ]] || { echo "MODEL_ARGS_SCRIPT ${MODEL_ARGS_SCRIPT} does not exist" >&2; exit 1; }
MODEL_ARGS=()
set +u  # slime's model files read optional variables (e.g. MODEL_ARGS_ROTARY_BASE) that may be unset
# shellcheck source=/dev/null
source "${MODEL_ARGS_SCRIPT}"
set -u
[[ ${#MODEL_ARGS[@]} -gt 0 ]] || { echo "${MODEL_ARGS_SCRIPT} did not define MODEL_ARGS" >&2; exit 1; }

: "${HF_CHECKPOINT:?set HF_CHECKPOINT to the Hugging Face model directory (weights for SGLang, config, tokenizer)}"
: "${REF_LOAD:?set REF_LOAD to the Megatron torch_dist checkpoint of the model (slime tools/convert_hf_to_torch_dist.py)}"
: "${SAVE:?set SAVE to the directory where training checkpoints are written}"
LOAD="${LOAD:-${SAVE}}"  # resumes from SAVE when it holds a checkpoint, else starts from REF_LOAD
SAVE_INTERVAL="${SAVE_INTERVAL:-20}"

# ------------------------------------------------------------------ data and rollout
OFFLINE_TOPK="${OFFLINE_TOPK:-}"
if [[ -n "${OFFLINE_TOPK}" ]]; then
  # the launcher takes --prompt-data (the data file beside it) and --loss-mask-type from the top-K file
  : "${SELF_DISTILL_CONFIG:=${PROJECT_ROOT}/configs/offline_topk_kd.yaml}"
  [[ "${OFFLINE_TOPK}" == /* ]] || OFFLINE_TOPK="${PWD}/${OFFLINE_TOPK}"
else
  : "${PROMPT_DATA:?set PROMPT_DATA to the JSONL/Parquet prompt file (rows with metadata.teacher_prompt; SDPO: prompts and labels)}"
fi
: "${SELF_DISTILL_CONFIG:=${PROJECT_ROOT}/configs/sdft.yaml}"
[[ -f "${SELF_DISTILL_CONFIG}" ]] || { echo "SELF_DISTILL_CONFIG ${SELF_DISTILL_CONFIG} does not exist (see configs/)" >&2; exit 1; }
# The Ray job may run in another working directory: pass an absolute path.
SELF_DISTILL_CONFIG="$(cd -- "$(dirname -- "${SELF_DISTILL_CONFIG}")" && pwd)/$(basename -- "${SELF_DISTILL_CONFIG}")"
# The same for every path the job reads or writes (a relative one would resolve in the job's directory).
for path_variable in HF_CHECKPOINT REF_LOAD SAVE LOAD PROMPT_DATA; do
  if [[ -n "${!path_variable:-}" && "${!path_variable}" != /* ]]; then
    printf -v "${path_variable}" '%s/%s' "${PWD}" "${!path_variable}"
  fi
done
# slime scores every rollout; the reward is logged, picks SDPO's successful responses (configs/sdpo.yaml) and, with
# --self-distill-rl-combination hybrid/additive, drives slime's policy loss.
if [[ -n "${OFFLINE_TOPK}" ]]; then
  REWARD_ARGS=()  # SFT data: nothing is scored
elif [[ -n "${CUSTOM_RM_PATH:-}" ]]; then
  REWARD_ARGS=(--custom-rm-path "${CUSTOM_RM_PATH}")
else
  : "${RM_TYPE:?set RM_TYPE to a slime --rm-type (e.g. math, deepscaler; random for rows without a label) or CUSTOM_RM_PATH}"
  REWARD_ARGS=(--rm-type "${RM_TYPE}")
fi
if [[ -n "${LABEL_KEY:-}" ]]; then
  REWARD_ARGS+=(--label-key "${LABEL_KEY}")
fi

# The recipes carry their method's rollout shape and optimizer settings (slime_args); set these to override them
# (or to give a recipe without them its values).
optional_flag() {  # optional_flag ARRAY_NAME FLAG VARIABLE_NAME: append "FLAG value" when the variable is set
  local -n target="$1"
  if [[ -n "${!3:-}" ]]; then
    target+=("$2" "${!3}")
  fi
}
if [[ -n "${OFFLINE_TOPK}" ]]; then
  # the launcher takes the data file's keys from the top-K file; METADATA_KEY / INPUT_KEY override them
  ROLLOUT_ARGS=(--self-distill-offline-topk-path "${OFFLINE_TOPK}")
  optional_flag ROLLOUT_ARGS --metadata-key METADATA_KEY
  optional_flag ROLLOUT_ARGS --input-key INPUT_KEY
  if [[ -n "${PROMPT_DATA:-}" ]]; then
    ROLLOUT_ARGS+=(--prompt-data "${PROMPT_DATA}")
  fi
else
  ROLLOUT_ARGS=(
    --prompt-data "${PROMPT_DATA}"
    --input-key "${INPUT_KEY:-prompt}"
    --metadata-key "${METADATA_KEY:-metadata}"
    --rollout-shuffle
  )
fi
optional_flag ROLLOUT_ARGS --num-rollout NUM_ROLLOUT
optional_flag ROLLOUT_ARGS --num-epoch NUM_EPOCH
optional_flag ROLLOUT_ARGS --rollout-batch-size ROLLOUT_BATCH_SIZE
optional_flag ROLLOUT_ARGS --n-samples-per-prompt N_SAMPLES_PER_PROMPT
optional_flag ROLLOUT_ARGS --rollout-max-response-len MAX_RESPONSE_LEN
optional_flag ROLLOUT_ARGS --rollout-temperature ROLLOUT_TEMPERATURE
optional_flag ROLLOUT_ARGS --global-batch-size GLOBAL_BATCH_SIZE
# (not for offline distillation: slime's SFT rollout renders the chat messages itself)
if [[ "${APPLY_CHAT_TEMPLATE:-1}" == 1 && -z "${OFFLINE_TOPK}" ]]; then
  ROLLOUT_ARGS+=(--apply-chat-template)
fi

# ------------------------------------------------------------------ cluster and parallelism
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS="$(nvidia-smi -L 2>/dev/null | wc -l | tr -d ' ')" || NUM_GPUS=0
fi
[[ "${NUM_GPUS}" -gt 0 ]] || { echo "no GPU detected: set NUM_GPUS (GPUs per node)" >&2; exit 1; }
ACTOR_NUM_NODES="${ACTOR_NUM_NODES:-1}"
CLUSTER_ARGS=(--actor-num-nodes "${ACTOR_NUM_NODES}" --actor-num-gpus-per-node "${NUM_GPUS}")
if [[ -n "${OFFLINE_TOPK}" ]]; then
  :  # no SGLang (--debug-train-only): the training actors have the GPUs to themselves
elif [[ "${COLOCATE:-1}" == 1 ]]; then
  CLUSTER_ARGS+=(--colocate)  # training and SGLang share the GPUs (train_async does not support it)
else
  : "${ROLLOUT_NUM_GPUS:?set ROLLOUT_NUM_GPUS (GPUs for SGLang) when COLOCATE=0}"
  CLUSTER_ARGS+=(--rollout-num-gpus "${ROLLOUT_NUM_GPUS}")
fi

PERF_ARGS=(
  --tensor-model-parallel-size "${TP:-1}"
  --pipeline-model-parallel-size "${PP:-1}"
  --context-parallel-size "${CP:-1}"
  --expert-model-parallel-size "${EP:-1}"
  --expert-tensor-parallel-size 1
  --recompute-granularity full
  --recompute-method uniform
  --recompute-num-layers 1
  # The teacher sequences (teacher prompt + response) are longer than the student's: leave headroom.
  --use-dynamic-batch-size
  --max-tokens-per-gpu "${MAX_TOKENS_PER_GPU:-8192}"
)
if [[ "${TP:-1}" -gt 1 ]]; then
  PERF_ARGS+=(--sequence-parallel)
fi

OPTIMIZER_ARGS=(--optimizer adam)
optional_flag OPTIMIZER_ARGS --lr LR
optional_flag OPTIMIZER_ARGS --lr-decay-style LR_DECAY_STYLE
optional_flag OPTIMIZER_ARGS --weight-decay WEIGHT_DECAY

SGLANG_ARGS=()
if [[ -z "${OFFLINE_TOPK}" ]]; then
  SGLANG_ARGS=(
    --rollout-num-gpus-per-engine "${ROLLOUT_GPUS_PER_ENGINE:-${TP:-1}}"
    --sglang-mem-fraction-static "${SGLANG_MEM_FRACTION:-0.6}"
  )
fi

MISC_ARGS=(
  --attention-dropout 0.0
  --hidden-dropout 0.0
  --accumulate-allreduce-grads-in-fp32
  --attention-softmax-in-fp32
  --attention-backend "${ATTENTION_BACKEND:-flash}"
)

TRAIN_ARGS=(
  --slime-root "${SLIME_ROOT}"
  --slime-entry "${SLIME_ENTRY:-train}"
  "${CLUSTER_ARGS[@]}"
  "${MODEL_ARGS[@]}"
  --hf-checkpoint "${HF_CHECKPOINT}"
  --ref-load "${REF_LOAD}"
  --load "${LOAD}"
  --save "${SAVE}"
  --save-interval "${SAVE_INTERVAL}"
  "${ROLLOUT_ARGS[@]}"
  "${REWARD_ARGS[@]}"
  "${PERF_ARGS[@]}"
  "${OPTIMIZER_ARGS[@]}"
  "${SGLANG_ARGS[@]}"
  "${MISC_ARGS[@]}"
  --custom-config-path "${SELF_DISTILL_CONFIG}"
  "$@"
)

# ------------------------------------------------------------------ validate, start Ray, submit
if [[ "${SKIP_PRECHECK:-0}" != 1 ]]; then
  "${PYTHON}" -m slime_self_distill.train --check-only "${TRAIN_ARGS[@]}"
fi

MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
HAS_NVLINK=0
if nvidia-smi topo -m 2>/dev/null | grep -q 'NV[0-9]'; then
  HAS_NVLINK=1
fi

ray start --head --node-ip-address "${MASTER_ADDR}" --num-gpus "${NUM_GPUS}" --disable-usage-stats \
  --dashboard-host=0.0.0.0 --dashboard-port="${DASHBOARD_PORT}"

if [[ "${WAIT_FOR_NODES:-0}" == 1 && "${ACTOR_NUM_NODES}" -gt 1 ]]; then
  until [[ "$("${PYTHON}" -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(len([n for n in ray.nodes() if n["Alive"]]))')" -ge "${ACTOR_NUM_NODES}" ]]; do
    echo "waiting for ${ACTOR_NUM_NODES} Ray nodes to join ${MASTER_ADDR}..."
    sleep 10
  done
fi

RUNTIME_ENV_JSON="$("${PYTHON}" - "${PYTHONPATH}" "${HAS_NVLINK}" <<'PY'
import json, sys
print(json.dumps({"env_vars": {"PYTHONPATH": sys.argv[1], "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                               "NCCL_NVLS_ENABLE": sys.argv[2]}}))
PY
)"

ray job submit --address="http://127.0.0.1:${DASHBOARD_PORT}" \
  --runtime-env-json="${RUNTIME_ENV_JSON}" \
  -- "${PYTHON}" -m slime_self_distill.train "${TRAIN_ARGS[@]}"
