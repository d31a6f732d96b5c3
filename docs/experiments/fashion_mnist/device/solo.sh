#!/usr/bin/env bash
# On the lent GPU (README "What the next run needs"): each objective's finetune alone on the card
# (one GPU job at a time), through the workflow, against a 20-step teacher (step time and memory do
# not depend on the teacher's weights). Then solo-wait.sh, in the same call.
# SOLO_OBJECTIVES: the objectives to time (default "np_kd igsm igsm_every4", run 10).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
# After teacher.sh (THEN_SOLO=1) it runs from /root/repo, where the wheels are already unpacked.
[ -d .device ] && bash docs/experiments/fashion_mnist/device/device.sh unpack .device
command -v python >/dev/null || ln -sf "$(command -v python3)" /usr/local/bin/python
mkdir -p /root/repo /root/solo
[ "$PWD" = /root/repo ] || tar --exclude=./.device -cf - . | tar -xf - -C /root/repo
cd /root/repo
export PYTHONPATH=/tmp/site:/root/repo PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee /root/solo/gpu.txt
python3 -c "import torch; print('torch', torch.__version__)" | tee -a /root/solo/gpu.txt
python3 - "${SOLO_OBJECTIVES:-np_kd igsm igsm_every4}" <<'PY'
import sys, yaml
c = yaml.safe_load(open("/root/repo/config/fashion_mnist.yaml"))
e = c["experiments"]["fmnist_unet"]
e["dense"]["training"].update(num_steps=20, checkpoint_every=20)
e["prune"].update(thr=0.5, num_images=32)  # only the widths matter for step time
e["finetune"]["runs"] = [{"channel_ratio": 0.3, "objectives": sys.argv[1].split()}]
e["finetune"]["training"]["num_steps"] = 150
c["experiments"] = {"fmnist_unet": e}
yaml.safe_dump(c, open("/root/solo/config.yaml", "w"), sort_keys=False)
with open("/root/solo/targets", "w") as f:
    for run in e["finetune"]["runs"]:
        for o in run["objectives"]:
            f.write(f"results/finetune/fmnist_unet/diff-pruning-cr{run['channel_ratio']}/{o}/summary.json\n")
PY
mapfile -t targets < /root/solo/targets
setsid nohup python3 -m snakemake -s /root/repo/Snakefile -d /root/solo --profile /root/repo/profiles/local \
    --resources gpu=1 --cores 16 --keep-going "${targets[@]}" --configfile /root/solo/config.yaml \
    > /root/solo/snakemake.log 2>&1 < /dev/null &
echo launched
