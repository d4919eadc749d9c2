#!/usr/bin/env bash
# Device side: every GPU measurement of the project, one after another, in the background, so that a
# sequence longer than one 10-minute device call keeps going while later calls poll it.
#   start:  source /tmp/stage/install.sh && bash scripts/gpu/run_all.sh start [STEP...]
#           (every step by default; name steps, e.g. `start bench-dummy bench-embedded`, to run only those)
#   poll:   bash scripts/gpu/run_all.sh poll     (copies finished results to $OUT)
set -u
results=/tmp/gpu-results
case "${1:-}" in
start)
  rm -rf /tmp/repo "$results" && mkdir -p "$results" && cp -r . /tmp/repo
  cd /tmp/repo
  cat > /tmp/gpu-driver.sh <<DRIVER
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PYTHONPATH
cd /tmp/repo
wanted="${*:2}"
step() { name=\$1; limit=\$2; shift 2
  if [ -n "\$wanted" ] && [[ " \$wanted " != *" \$name "* ]]; then return; fi
  echo "\$(date +%T) start \$name" >> $results/steps.log
  timeout \$limit "\$@" > $results/\$name.log 2>&1; echo "\$(date +%T) end \$name rc=\$?" >> $results/steps.log; }
step bf16 600 python3 scripts/gpu/bf16.py --out $results --repeats 3
step vllm 600 python3 scripts/gpu/vllm.py --out $results
step quantized 500 python3 scripts/gpu/quantized.py --out $results --engines bf16 nf4 int8 gptq-int4
step spec 400 python3 scripts/gpu/spec.py --out $results
step bench-dummy 600 python3 scripts/gpu/bench.py --suite dummy --engines bf16,bf16-compiled,vllm,vllm-fp8kv --out $results/bench-dummy
step bench-embedded 600 python3 scripts/gpu/bench.py --suite embedded --out $results/bench-embedded
step bench-dummy-int4 600 python3 scripts/gpu/bench.py --suite dummy --engines nf4,gptq-int4 --out $results/bench-dummy-int4
step reliability 300 python3 scripts/gpu/reliability.py --out $results
echo "\$(date +%T) all done" >> $results/steps.log
DRIVER
  setsid nohup bash /tmp/gpu-driver.sh > /tmp/gpu-driver.out 2>&1 < /dev/null &
  echo "started; steps log: $results/steps.log" ;;
poll)
  cat "$results/steps.log" 2>/dev/null
  cp -r "$results"/. "${OUT:-/tmp/out}/" 2>/dev/null
  echo "--- GPU: $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader)" ;;
*) echo "usage: run_all.sh start|poll" >&2; exit 2 ;;
esac
