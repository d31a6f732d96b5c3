#!/usr/bin/env bash
# On the lent GPU, after solo.sh: wait up to $1 s for the solo finetunes; pack what is done into $OUT.
end=$((SECONDS + $1))
while [ $SECONDS -lt $end ] && pgrep -f "snakemake" >/dev/null; do sleep 10; done
tail -3 /root/solo/snakemake.log
cd /root/solo
ls results/finetune/fmnist_unet/*/*/summary.json 2>/dev/null
tar -czf "$OUT/solo.tgz" gpu.txt config.yaml snakemake.log results/finetune/fmnist_unet/*/*/summary.json \
    results/finetune/fmnist_unet/*/*/metrics.jsonl results/logs results/benchmarks \
    results/prune/fmnist_unet/*/report.json results/dense/fmnist_unet/trained/summary.json 2>/dev/null
for s in results/finetune/fmnist_unet/*/*/summary.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); t=d['timing']; print(sys.argv[1].split('/')[3:5], round(t['sec_per_step'],4), round((t.get('peak_memory_mib') or 0)/1024,2))" $s
done
