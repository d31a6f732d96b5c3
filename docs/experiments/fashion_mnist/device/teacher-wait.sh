#!/usr/bin/env bash
# On the lent GPU, after teacher.sh (each call: `bash …/teacher-wait.sh 540`, the next call at once:
# the machine goes back 30 s after a call): wait up to $1 s (or until stage $2 is done), print
# progress, pack the newest finished stage into $OUT in 15 MB parts (join: cat *.part* | tar -x).
end=$((SECONDS + $1)); want=/root/fm/teacher_curve/trained-${2:-12500}
while [ $SECONDS -lt $end ] && [ ! -d $want ]; do
    pgrep -f stages.sh >/dev/null || { echo "stages.sh not running"; break; }
    sleep 15
done
tail -4 /root/fm.log; tail -n 2 /root/fm/results/logs/dense/fmnist_unet.log 2>/dev/null | cut -c1-300
for d in /root/fm/teacher_curve/trained-12500 /root/fm/teacher_curve/trained-10000; do
  if [ -d $d ]; then
    cd $d; tar -cf - model | split -b 15M - "$OUT/$(basename $d).tar.part"
    tar -czf "$OUT/$(basename $d)-files.tgz" metrics.jsonl summary.json /root/fm.log /root/fm/results/logs 2>/dev/null
    sha256sum model/*; ls -la $OUT; break
  fi
done
