# Extra arguments go to benchmarks/quality.py (later ones win), e.g. run2: --deadline 530 --runs hybrid,... 
source benchmarks/gpu/site.sh
nvidia-smi --query-gpu=name --format=csv,noheader
rm -rf /tmp/q /tmp/qout  # this script's scratch: a warm machine keeps the last call's runs, which --overwrite would refuse to mix
python3 benchmarks/quality.py --teacher .gpu/teacher --train .gpu/corpus/train.jsonl.xz --valid .gpu/corpus/valid.jsonl \
  --work /tmp/q --out /tmp/qout --deadline 545 "$@" > /tmp/qout.run.log 2>&1
rc=$?
mkdir -p $OUT/q
cp /tmp/qout/quality.json $OUT/q/ 2>/dev/null
cp /tmp/qout.run.log $OUT/q/run.log
(cd /tmp/qout && tar czf $OUT/q/logs.tgz *.log) 2>/dev/null
tail -30 /tmp/qout.run.log
exit $rc
