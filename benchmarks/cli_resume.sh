#!/bin/bash
# kill -9 a default-model GPTQ run half-way, resume it, compare with an uninterrupted run; time the checkpoints
set -e
cd "$(dirname "$0")/.."
LQ=".venv/bin/llmquant"
D=/tmp/cr; rm -rf $D; mkdir -p $D
/usr/bin/time -f "full: %e s, peak %M KB" $LQ quantize --method gptq --scheme W4G64 -o $D/full > $D/full.log 2>&1
tail -3 $D/full.log
$LQ quantize --method gptq --scheme W4G64 -o $D/r > $D/r1.log 2>&1 &
PID=$!
sleep ${KILL_AFTER:-70}
kill -9 $PID || true
wait $PID || true
python3 -c "import json;p=json.load(open('$D/.r.partial/.llmquant-resume/progress.json'));print('killed after layer',p['done'],'of',p['total'])"
du -sh $D/.r.partial
/usr/bin/time -f "resume: %e s, peak %M KB" $LQ quantize --method gptq --scheme W4G64 -o $D/r --resume > $D/r2.log 2>&1
tail -4 $D/r2.log
python3 - <<'PY'
import json
a=json.load(open('/tmp/cr/full/llmquant.json'))['tensors']; b=json.load(open('/tmp/cr/r/llmquant.json'))['tensors']
print('identical sha256 of all', len(a), 'tensors:', {k:v['sha256'] for k,v in a.items()}=={k:v['sha256'] for k,v in b.items()})
PY
ls -a $D
