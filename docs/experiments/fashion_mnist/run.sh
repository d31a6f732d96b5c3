#!/usr/bin/env bash
# The Fashion-MNIST experiment (config/fashion_mnist.yaml) on one GPU, as it was run for the report:
#   1. the dense teacher grown in stages (dense.training.num_steps = each of TEACHER_STEPS in turn;
#      each stage resumes from the last one's snapshot); each stage's weights are copied to
#      teacher_curve/model-<steps> and scored (10k-sample FID) as experiment teacher_<steps> in a
#      Snakemake of their own (teacher_curve/score) while the next stage trains:
#      teacher_curve/fid-<steps>.json, grid-<steps>.png;
#   2. everything else: prune, finetune, sample, FID, tables. The last stage is the run's teacher:
#      its curve point is the run's own teacher FID (results/fid/fmnist_unet/dense.json), copied
#      to teacher_curve/ once made, not a second scoring.
#   3. ("ladder" mode, issue 33) the ladder's finetunes (LADDER below: ratios 0.3 and 0.5 × np_kd,
#      igsm, igsm_lam1e-2, igsm_t10 × seeds 0 and 1) extended rung by rung to each of LADDER_STEPS,
#      each rung resuming the last one's snapshots, scored with 10k samples; each rung's raw files
#      go to ladder/<steps>/ (report.py collect), the shared inputs to shared.tar (below).
# Usage: docs/experiments/fashion_mnist/run.sh [teacher | ladder]
#   ("teacher": only the teacher curve; "ladder": the ladder, on TEACHER)
# After a run: report.py collect WORK RAW, report.py build RAW... OUT (report.py's docstring).
# Environment:
#   CONFIG         the config (default config/fashion_mnist.yaml)
#   WORK           Snakemake's working directory, results/ goes there (default: the checkout)
#   GPU_JOBS       GPU jobs side by side on the one GPU (default 4); CORES (default: all)
#   GPU_MEM_MB     GPU memory in MB that they may hold together, counted by each stage's
#                  resources.<stage>.gpu_mem_mb (default: all of the GPUs' memory, from nvidia-smi)
#   TEACHER_STEPS  the stages (default "2500 5000 7500 10000 12500"; the last must equal the
#                  config's num_steps)
#   TEACHER        a teacher folder written by an earlier run (results/dense/fmnist_unet/trained/model
#                  or teacher_curve/model-<steps>): used as dense.pretrained, no teacher stages
#   TARGETS        what to build (default all_tables; e.g. "results/tables/fmnist_unet.md")
#   LADDER_STEPS   the ladder's rungs (default "600 2400 6000")
#   LADDER_RATIOS  the ladder's channel ratios (default "0.3 0.5"; one lease fits about one ratio's rung 600)
#   LADDER_OBJECTIVES  the ladder's objectives (default "np_kd igsm igsm_lam1e-2 igsm_t10"; a lease that
#                  continues a split run names the ones still to score); OBJECTIVE@SEED runs that one
#                  for that seed only (e.g. "igsm@0 np_kd@1": a long finetune of one seed beside a short
#                  one of the other)
#   LADDER_FIRST   objectives whose models Snakemake runs first (--prioritize; default "np_kd igsm"),
#                  so that a lease that ends mid-rung leaves the main comparison scored
#   LADDER_SEEDS   the finetune seeds to run (default "0 1": fmnist_unet and fmnist_unet_seed1, by their
#                  finetune.training.seed); one seed per lease where a rung's finetunes outlast a lease
#   LADDER_TEACHER_FID  "no": the teacher's FID is not sampled again (a lease after one that scored it
#                  on the same reference; run 11's two leases agreed to 0.008); default "yes"
#   LADDER_LOG_EVERY  the ladder finetunes' log_every (default 200: the per-timestep diagnostics cost
#                  seconds per log step on the Jacobian runs, run 4; the config's 50 doubles rung 600's cost)
#   SHARED         shared.tar of an earlier machine's run of the same experiment: its pruned
#                  students and FID reference statistics are used here (each file checked against
#                  the tar's digests.json, and against a copy already in WORK), so that a run split
#                  over several GPU machines compares models of one student and one reference.
#                  Every run writes its own $WORK/shared.tar for the next machine.
#   DRY_RUN        non-empty: with TEACHER, prepare WORK (the teacher's folder, the data, SHARED's
#                  files) and print what the run would do (snakemake --dry-run), nothing else
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
WORK=${WORK:-$REPO}
CONFIG=${CONFIG:-$REPO/config/fashion_mnist.yaml}
TEACHER_STEPS=${TEACHER_STEPS:-"2500 5000 7500 10000 12500"}
if [ -z "${GPU_MEM_MB:-}" ] && command -v nvidia-smi > /dev/null; then  # MiB per GPU → MB in all
    GPU_MEM_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits \
                 | awk '{ mib += $1 } END { printf "%d", mib * 1.048576 }')
fi
# --resources takes several values: it goes before a single-valued option, targets after.
SNAKEMAKE=(snakemake -s "$REPO/Snakefile" -d "$WORK" --profile "$REPO/profiles/local"
           --resources "gpu=${GPU_JOBS:-4}" ${GPU_MEM_MB:+"gpu_mem_mb=$GPU_MEM_MB"}
           --cores "${CORES:-$(nproc)}")
PLAN_ONLY=(${DRY_RUN:+--dry-run --quiet rules})
# The configs below (derived ones, then CONFIG) share WORK on purpose, as the scorings share
# teacher_curve/score: each is added to the folder's record first (README: Nothing lost).
SHARE=(env "PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}" python -m igsm.results_owner share)
mkdir -p "$WORK/teacher_curve"

derive_config() {  # derive_config OUT KEY VALUE [STEPS]: the config with fmnist_unet's teacher changed
    # KEY num_steps: the teacher trains VALUE steps; KEY pretrained: the teacher is the folder VALUE.
    # STEPS: the teacher alone, as an experiment teacher_<STEPS> (a name per stage: nothing reused).
    python - "$CONFIG" "$@" <<'PY'
import sys, yaml
source, out, key, value, *steps = sys.argv[1:]
config = yaml.safe_load(open(source))
settings = config["experiments"]["fmnist_unet"]
if key == "num_steps":
    settings["dense"]["training"]["num_steps"] = int(value)
else:
    settings["dense"] = {"pretrained": value}
if steps:
    settings["finetune"]["runs"] = []
    config["experiments"] = {f"teacher_{steps[0]}": settings}
yaml.safe_dump(config, open(out, "w"), sort_keys=False)
PY
}

ladder_config() {  # ladder_config OUT STEPS: the ladder's experiments, finetunes of STEPS steps
    # Writes OUT.targets (every model's FID file) and OUT.first (those of LADDER_FIRST's objectives).
    python - "$1" "$2" "${LADDER_RATIOS:-0.3 0.5}" "${LADDER_FIRST-np_kd igsm}" "${LADDER_LOG_EVERY:-200}" \
        "${LADDER_OBJECTIVES:-np_kd igsm igsm_lam1e-2 igsm_t10}" "${LADDER_SEEDS:-0 1}" \
        "${LADDER_TEACHER_FID:-yes}" <<'PY'
import sys, yaml
out, steps, ratios, first, log_every, objectives, seeds, teacher_fid = sys.argv[1:]
config = yaml.safe_load(open(out))
seeds = seeds.split()
objectives = [item.partition("@")[::2] for item in objectives.split()]  # (objective, seed or "")
unknown = sorted({objective for objective, _ in objectives} - set(config["objectives"]))
if unknown:
    sys.exit(f"LADDER_OBJECTIVES: {', '.join(unknown)} not among the config's objectives")
if teacher_fid not in ("yes", "no"):
    sys.exit(f"LADDER_TEACHER_FID: {teacher_fid!r}, expected yes or no")
experiments = {name: config["experiments"][name] for name in ("fmnist_unet", "fmnist_unet_seed1")}
seed_of = {name: str(settings["finetune"]["training"].get("seed", 0)) for name, settings in experiments.items()}
for variable, asked in (("LADDER_SEEDS", seeds), ("LADDER_OBJECTIVES", [s for _, s in objectives if s])):
    unknown = sorted(set(asked) - set(seed_of.values()))
    if unknown:
        sys.exit(f"{variable}: {', '.join(unknown)} is not the finetune seed of "
                 + ", ".join(f"{name} ({seed})" for name, seed in seed_of.items()))
# An experiment whose seed is left out stays, with no finetunes: fmnist_unet_seed1 takes its teacher
# from fmnist_unet (dense.from_experiment).
config["experiments"] = experiments
for name, settings in experiments.items():
    own = [objective for objective, seed in objectives if seed in ("", seed_of[name])]
    runs = [{"channel_ratio": float(ratio), "objectives": own} for ratio in ratios.split()]
    settings["finetune"]["runs"] = runs if seed_of[name] in seeds and own else []
    settings["finetune"]["training"]["num_steps"] = int(steps)
    settings["finetune"]["training"]["log_every"] = int(log_every)
yaml.safe_dump(config, open(out, "w"), sort_keys=False)
with open(out + ".targets", "w") as targets, open(out + ".first", "w") as prioritized:
    for name, settings in experiments.items():
        if teacher_fid == "yes":
            targets.write(f"results/fid/{name}/dense.json\n")
        for run in settings["finetune"]["runs"]:
            for objective in run["objectives"]:
                target = f"results/fid/{name}/diff-pruning-cr{run['channel_ratio']}/{objective}.json\n"
                targets.write(target)
                if objective in first.split():
                    prioritized.write(target)
PY
}

# The inputs that several machines of one split run must share: pruned students and FID reference.
SHARED_PATHS=(results/prune results/fid_reference)
share_inputs() {  # $WORK/shared.tar with a digests.json of its files, for the next machine
    (cd "$WORK" && find "${SHARED_PATHS[@]}" -type f 2>/dev/null | sort | xargs -r sha256sum \
        > shared-digests.txt && tar -cf shared.tar.tmp shared-digests.txt $(cut -c67- shared-digests.txt) \
        && mv shared.tar.tmp shared.tar)
}
use_shared() {  # unpack $SHARED into $WORK/results, each file checked against the tar's digests
    local unpacked=$WORK/shared.in
    rm -rf "$unpacked"; mkdir -p "$unpacked"
    tar -xf "$SHARED" -C "$unpacked"
    (cd "$unpacked" && sha256sum --quiet -c shared-digests.txt) \
        || { echo "$SHARED: a file does not match its digest in shared-digests.txt" >&2; exit 1; }
    while read -r digest path; do
        if [ -e "$WORK/$path" ] && [ "$(sha256sum < "$WORK/$path" | cut -c1-64)" != "$digest" ]; then
            echo "$WORK/$path differs from $path in $SHARED: these runs would not share their inputs" >&2
            exit 1
        fi
        mkdir -p "$(dirname "$WORK/$path")"; cp -p "$unpacked/$path" "$WORK/$path"
        touch "$WORK/$path"  # newer than the teacher, so that Snakemake keeps it
    done < "$unpacked/shared-digests.txt"
}

if [ -n "${TEACHER:-}" ]; then  # a teacher trained by an earlier run: no teacher stages
    config=$WORK/teacher_curve/config-pretrained.yaml
    derive_config "$config" pretrained "$TEACHER"
    "${SHARE[@]}" "$WORK" "$config"
    if [ -n "${SHARED:-}" ]; then  # the inputs of pruning and reference first, then the shared files, newer
        "${SNAKEMAKE[@]}" results/dense/fmnist_unet/pretrained/model results/data/fashion_mnist/train \
            --configfile "$config"
        use_shared
    fi
    if [ "${1:-}" = ladder ]; then
        for steps in ${LADDER_STEPS:-600 2400 6000}; do
            cp "$config" "$WORK/teacher_curve/config-ladder-$steps.yaml"
            ladder_config "$WORK/teacher_curve/config-ladder-$steps.yaml" "$steps"
            "${SHARE[@]}" "$WORK" "$WORK/teacher_curve/config-ladder-$steps.yaml"
            mapfile -t targets < "$WORK/teacher_curve/config-ladder-$steps.yaml.targets"
            mapfile -t first < "$WORK/teacher_curve/config-ladder-$steps.yaml.first"
            prioritize=(); [ ${#first[@]} = 0 ] || prioritize=(--prioritize "${first[@]}")
            status=0
            "${SNAKEMAKE[@]}" "${PLAN_ONLY[@]}" --keep-going "${targets[@]}" "${prioritize[@]}" \
                --configfile "$WORK/teacher_curve/config-ladder-$steps.yaml" || status=$?
            if [ -n "${DRY_RUN:-}" ]; then [ "$status" = 0 ] || exit "$status"; continue; fi
            share_inputs
            python "$REPO/docs/experiments/fashion_mnist/report.py" collect "$WORK" "$WORK/ladder/$steps" "$steps"
            [ "$status" = 0 ] || exit "$status"
        done
        exit 0
    fi
    status=0
    "${SNAKEMAKE[@]}" "${PLAN_ONLY[@]}" --keep-going ${TARGETS:-all_tables} --configfile "$config" || status=$?
    [ -n "${DRY_RUN:-}" ] || share_inputs
    exit "$status"
fi
[ "${1:-}" = ladder ] && { echo "run.sh ladder needs TEACHER (a teacher folder)" >&2; exit 2; }
[ -n "${DRY_RUN:-}" ] && { echo "run.sh: DRY_RUN needs TEACHER (the teacher stages train as they go)" >&2; exit 2; }

score_stage() {  # the 10k-sample FID of teacher_curve/model-$1, as an experiment of its own
    local score=$WORK/teacher_curve/score
    mkdir -p "$score"
    derive_config "$score/config-$1.yaml" pretrained "$WORK/teacher_curve/model-$1" "$1"
    flock "$score.lock" "${SHARE[@]}" "$score" "$score/config-$1.yaml"
    # One scoring at a time (they share the FID reference, computed by the first).
    flock "$score.lock" snakemake -s "$REPO/Snakefile" -d "$score" --profile "$REPO/profiles/local" \
        --configfile "$score/config-$1.yaml" --resources "gpu=1" --cores "${CORES:-$(nproc)}" \
        "results/fid/teacher_$1/dense.json" > "$WORK/teacher_curve/score-$1.log" 2>&1
    cp "$score/results/fid/teacher_$1/dense.json" "$WORK/teacher_curve/fid-$1.json"
    cp "$score/results/samples/teacher_$1/dense/grid.png" "$WORK/teacher_curve/grid-$1.png"
}

scorers=()
last=${TEACHER_STEPS##* }
for steps in $TEACHER_STEPS; do
    config=$WORK/teacher_curve/config-$steps.yaml
    derive_config "$config" num_steps "$steps"
    "${SHARE[@]}" "$WORK" "$config"
    "${SNAKEMAKE[@]}" results/dense/fmnist_unet/trained/model --configfile "$config"
    rm -rf "$WORK/teacher_curve/model-$steps.tmp"
    cp -a "$WORK/results/dense/fmnist_unet/trained/model" "$WORK/teacher_curve/model-$steps.tmp"
    mv "$WORK/teacher_curve/model-$steps.tmp" "$WORK/teacher_curve/model-$steps"
    if [ "${1:-}" = teacher ] || [ "$steps" != "$last" ]; then
        score_stage "$steps" & scorers+=($!)
    fi
done
for pid in "${scorers[@]}"; do wait "$pid"; done  # set -e: a failed scoring stops here
[ "${1:-}" = teacher ] && exit 0
status=0
"${SHARE[@]}" "$WORK" "$CONFIG"
"${SNAKEMAKE[@]}" --keep-going ${TARGETS:-all_tables} --configfile "$CONFIG" || status=$?
if [ -f "$WORK/results/fid/fmnist_unet/dense.json" ]; then  # the last stage's curve point
    cp "$WORK/results/fid/fmnist_unet/dense.json" "$WORK/teacher_curve/fid-$last.json"
    cp "$WORK/results/samples/fmnist_unet/dense/grid.png" "$WORK/teacher_curve/grid-$last.png"
fi
exit "$status"
