# Issue 35's measurement in one GPU call: experts A (books) and B (Debian non-book text), their `tcache merge`, the
# 50/50 mixture student and expert A with step 3 (--qk-merge), scored on books, B's held-out set and every held-out
# set, with the recall probe. Extra arguments go to benchmarks/merge.py (later ones win).
source benchmarks/gpu/site.sh
nvidia-smi --query-gpu=name --format=csv,noheader
rm -rf /tmp/m /tmp/mout  # this script's scratch: a warm machine keeps the last call's runs
python3 benchmarks/merge.py --teacher .gpu/teacher --train .gpu/corpus/train.jsonl.xz --valid .gpu/corpus/valid.jsonl \
  --work /tmp/m --out /tmp/mout --deadline 520 "$@" > /tmp/mout.run.log 2>&1
rc=$?
mkdir -p $OUT/merge
cp /tmp/mout/merge.json /tmp/mout/merge.md $OUT/merge/ 2>/dev/null
cp /tmp/mout.run.log $OUT/merge/run.log
(cd /tmp/mout && tar czf $OUT/merge/logs.tgz *.log) 2>/dev/null
tail -40 /tmp/mout.run.log
exit $rc
