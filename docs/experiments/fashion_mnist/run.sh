#!/usr/bin/env bash
# The Fashion-MNIST experiment (config/fashion_mnist.yaml) on one GPU, as it was run for the report:
#   1. the dense teacher grown in stages (dense.training.num_steps = each of TEACHER_STEPS in turn;
#      each stage resumes from the last one's snapshot) with its 10k-sample FID after each stage;
#   2. everything else: prune, finetune, sample, FID, tables.
# Usage: docs/experiments/fashion_mnist/run.sh [teacher]   ("teacher": only train the first stage)
# Environment: WORK (Snakemake's working directory; results/ goes there; default: the checkout),
# GPU_JOBS (GPU jobs side by side on the one GPU; default 4), CORES (default: all),
# TEACHER_STEPS (default "1500 3000"; the last must equal the config's num_steps), TEACHER (a
# teacher folder written by an earlier run, results/dense/fmnist_unet/trained/model: used as
# dense.pretrained, no teacher stages), TARGETS (what to build; default all_tables, e.g.
# "results/tables/fmnist_unet.md" for one experiment).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
WORK=${WORK:-$REPO}
CONFIG=$REPO/config/fashion_mnist.yaml
TEACHER_STEPS=${TEACHER_STEPS:-"1500 3000"}
# --resources takes several values: it goes before a single-valued option, targets after.
SNAKEMAKE=(snakemake -s "$REPO/Snakefile" -d "$WORK" --profile "$REPO/profiles/local"
           --resources "gpu=${GPU_JOBS:-4}" --cores "${CORES:-$(nproc)}")
mkdir -p "$WORK/teacher_curve"

stage_config() {  # the experiment's config with the teacher's num_steps set to $1
    python - "$CONFIG" "$1" "$WORK/teacher_curve/config-$1.yaml" <<'PY'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["experiments"]["fmnist_unet"]["dense"]["training"]["num_steps"] = int(sys.argv[2])
yaml.safe_dump(config, open(sys.argv[3], "w"), sort_keys=False)
PY
    echo "$WORK/teacher_curve/config-$1.yaml"
}

if [ -n "${TEACHER:-}" ]; then  # a teacher trained by an earlier run: no teacher stages
    config=$WORK/teacher_curve/config-pretrained.yaml
    python - "$CONFIG" "$TEACHER" "$config" <<'PY'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["experiments"]["fmnist_unet"]["dense"] = {"pretrained": sys.argv[2]}
yaml.safe_dump(config, open(sys.argv[3], "w"), sort_keys=False)
PY
    exec "${SNAKEMAKE[@]}" --keep-going ${TARGETS:-all_tables} --configfile "$config"
fi

for steps in $TEACHER_STEPS; do
    config=$(stage_config "$steps")
    "${SNAKEMAKE[@]}" results/dense/fmnist_unet/trained/model --configfile "$config"
    [ "${1:-}" = teacher ] && exit 0
    "${SNAKEMAKE[@]}" results/fid/fmnist_unet/dense.json --configfile "$config"
    cp "$WORK/results/fid/fmnist_unet/dense.json" "$WORK/teacher_curve/fid-$steps.json"
    cp "$WORK/results/samples/fmnist_unet/dense/grid.png" "$WORK/teacher_curve/grid-$steps.png"
done
"${SNAKEMAKE[@]}" --keep-going ${TARGETS:-all_tables} --configfile "$CONFIG"
