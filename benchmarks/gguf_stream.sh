#!/bin/bash
# default model (a Q4_1 GGUF file): RTN W4G64 and GPTQ W4G64 loaded whole vs streamed from the GGUF; peak RSS, identical output
cd "$(dirname "$0")/.."
LQ=.venv/bin/llmquant
D=/tmp/gs; rm -rf $D; mkdir -p $D
for m in rtn; do
  /usr/bin/time -f "$m whole: %e s, peak %M KB" $LQ quantize --method $m --scheme W4G64 -o $D/$m-whole 2>&1 | tail -1
  /usr/bin/time -f "$m streamed: %e s, peak %M KB" $LQ quantize --stream --method $m --scheme W4G64 -o $D/$m-stream 2>&1 | tail -1
  python3 - $D/$m-whole $D/$m-stream <<'PY'
import json, sys
a = json.load(open(sys.argv[1] + "/llmquant.json"))["tensors"]; b = json.load(open(sys.argv[2] + "/llmquant.json"))["tensors"]
same = [k for k in a if "layers" in k and a[k]["sha256"] == b.get(k, {}).get("sha256")]
print("decoder-layer tensors identical:", len(same), "of", sum("layers" in k for k in a))
PY
done
