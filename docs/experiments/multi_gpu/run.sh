#!/usr/bin/env bash
# Issue 18 on a machine with 2 GPUs: the finetune and sampling stages of the workflow with 1 and
# 2 GPUs per job (NCCL), as a user runs them (snakemake, profiles/local). Then compare.py.
#   base        dense (20 steps) and the magnitude-pruned student, once; copied into each run below
#   g1, g2      finetunes np_kd and igsm, fp32 + deterministic, 30 steps, 1 / 2 GPUs per job;
#               the dense model's 1,000 samples (strict fp32) with 1 / 2 processes
#   g2_resumed  igsm with 2 GPUs, every process of the job sent SIGTERM (as SLURM does) after the
#               step-10 snapshot, then the same snakemake command again
#   g2_again    (only if g2_resumed differs from g2) igsm with 2 GPUs once more: is a plain rerun
#               bitwise equal, i.e. is a difference the resume's or the GPU's?
#   t1, t2      throughput: both objectives, bf16, PyTorch's default kernels, 100 steps, one job
#               at a time, 1 / 2 GPUs per job
# Usage: WORK=/root/mg docs/experiments/multi_gpu/run.sh; python compare.py $WORK OUT
# RESUME_ONLY=1: only base, g2 (igsm) and g2_resumed (and g2_again): the resume check alone.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
WORK=${WORK:-/root/mg}
CONFIG=${CONFIG:-$REPO/docs/experiments/multi_gpu/config.yaml}
FT=results/finetune/ddp/magnitude-cr0.3
mkdir -p "$WORK/configs"

variant() {  # name gpu precision deterministic num_steps log_every
    python - "$CONFIG" "$WORK/configs/$1.yaml" "$2" "$3" "$4" "$5" "$6" <<'PY'
import sys, yaml
source, target, gpu, precision, deterministic, steps, log_every = sys.argv[1:]
config = yaml.safe_load(open(source))
config["resources"]["finetune"]["gpu"] = config["resources"]["sample"]["gpu"] = int(gpu)
training = config["experiments"]["ddp"]["finetune"]["training"]
training.update(precision=precision, deterministic=deterministic == "true",
                num_steps=int(steps), log_every=int(log_every))
yaml.safe_dump(config, open(target, "w"), sort_keys=False)
PY
}
smk() {  # run-folder gpu-slots config target...
    local run=$1 slots=$2 config=$3; shift 3
    # base's results are copied into each run folder: its config shares them on purpose (README: Nothing lost).
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" python -m igsm.results_owner share "$WORK/$run" "$WORK/configs/$config.yaml"
    # Targets first: --resources and --configfile take several values each.
    snakemake "$@" -s "$REPO/Snakefile" -d "$WORK/$run" --profile "$REPO/profiles/local" \
        --cores "$(nproc)" --configfile "$WORK/configs/$config.yaml" --resources "gpu=$slots"
}
stamp() { echo "== $(date +%T) $*"; }

variant g1 1 fp32 true 30 1
variant g2 2 fp32 true 30 1
variant t1 1 bf16 false 100 10
variant t2 2 bf16 false 100 10

stamp base; smk base 2 g1 results/prune/ddp/magnitude-cr0.3/model
for run in g1 g2 g2_resumed t1 t2; do rm -rf "${WORK:?}/$run"; cp -a "$WORK/base" "$WORK/$run"; done

if [ -n "${RESUME_ONLY:-}" ]; then
    stamp g2; smk g2 2 g2 "$FT/igsm/model"
else
    stamp g1; smk g1 2 g1 "$FT/np_kd/model" "$FT/igsm/model" results/samples/ddp/dense/samples.npz
    stamp g2; smk g2 2 g2 "$FT/np_kd/model" "$FT/igsm/model" results/samples/ddp/dense/samples.npz
fi

stamp g2_resumed
smk g2_resumed 2 g2 "$FT/igsm/model" > "$WORK/g2_resumed-first.log" 2>&1 &
first_attempt=$!
metrics=$WORK/g2_resumed/$FT/igsm/metrics.jsonl
until [ -f "$metrics" ] && [ "$(wc -l < "$metrics")" -ge 13 ]; do
    kill -0 "$first_attempt" 2>/dev/null || { echo "first attempt ended before step 13"; break; }
    sleep 0.2
done
# SIGTERM to every process of the job (torchrun and both workers), as SLURM's scancel does.
for pid in $(pgrep -f "[i]gsm train"); do
    if [ "$(readlink "/proc/$pid/cwd")" = "$WORK/g2_resumed" ]; then kill -TERM "$pid" && echo "SIGTERM to $pid"; fi
done
wait "$first_attempt" || echo "first attempt exited with $? (expected: the job stopped on SIGTERM)"
stamp g2_resumed rerun; smk g2_resumed 2 g2 "$FT/igsm/model"

if ! cmp -s "$WORK/g2/$FT/igsm/model/model.safetensors" \
            "$WORK/g2_resumed/$FT/igsm/model/model.safetensors"; then
    stamp g2_again; rm -rf "${WORK:?}/g2_again"; cp -a "$WORK/base" "$WORK/g2_again"
    smk g2_again 2 g2 "$FT/igsm/model"
fi

[ -n "${RESUME_ONLY:-}" ] && { stamp done; exit 0; }
stamp t1; smk t1 1 t1 "$FT/np_kd/model" "$FT/igsm/model"
stamp t2; smk t2 2 t2 "$FT/np_kd/model" "$FT/igsm/model"
stamp done
