#!/usr/bin/env bash
# On the lent GPU (README "What the next run needs"): set up, then train the teacher through the
# workflow in the background, in two stages (10,000 then 12,500 steps, the second resuming from the
# first's snapshot), as run.sh does. Needs `device.sh pack .device` here and `carry: [".device"]`.
# TEACHER_STAGES="10000" stops after the first stage; THEN_SOLO=1 runs solo.sh once the teacher is
# done (the card is then free again, so the solo timings stay solo).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
bash docs/experiments/fashion_mnist/device/device.sh unpack .device
command -v python >/dev/null || ln -sf "$(command -v python3)" /usr/local/bin/python
mkdir -p /root/repo /root/fm/teacher_curve
tar --exclude=./.device -cf - . | tar -xf - -C /root/repo
cd /root/repo
export PYTHONPATH=/tmp/site:/root/repo PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
python3 -c "import snakemake, igsm.cli, torch_pruning, diffusers, cleanfid; import importlib.metadata as m; print('imports ok, torch-pruning', m.version('torch-pruning'))"
nvidia-smi --query-gpu=name,memory.total --format=csv
cat > /root/stages.sh <<'SH'
set -e
for steps in $TEACHER_STAGES; do
  python3 -c "
import sys, yaml
c = yaml.safe_load(open('/root/repo/config/fashion_mnist.yaml'))
c['experiments']['fmnist_unet']['dense']['training']['num_steps'] = int(sys.argv[1])
yaml.safe_dump(c, open('/root/fm/teacher_curve/config-%s.yaml' % sys.argv[1], 'w'), sort_keys=False)" $steps
  # Both stages' configs write into /root/fm on purpose (README: Nothing lost).
  python3 -m igsm.results_owner share /root/fm /root/fm/teacher_curve/config-$steps.yaml
  python3 -m snakemake -s /root/repo/Snakefile -d /root/fm --profile /root/repo/profiles/local \
    --resources gpu=1 --cores 16 results/dense/fmnist_unet/trained/model \
    --configfile /root/fm/teacher_curve/config-$steps.yaml
  cp -a /root/fm/results/dense/fmnist_unet/trained /root/fm/teacher_curve/trained-$steps.tmp
  mv /root/fm/teacher_curve/trained-$steps.tmp /root/fm/teacher_curve/trained-$steps
done
if [ -n "$THEN_SOLO" ]; then bash /root/repo/docs/experiments/fashion_mnist/device/solo.sh; fi
SH
TEACHER_STAGES=${TEACHER_STAGES:-10000 12500} THEN_SOLO=${THEN_SOLO:-} setsid nohup bash /root/stages.sh > /root/fm.log 2>&1 < /dev/null &
echo launched
