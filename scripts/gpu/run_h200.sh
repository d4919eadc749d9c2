#!/usr/bin/env bash
# Device side, the H200 session (issues 16 and 17): installs the staged bundle and runs every step of
# scripts/gpu/h200.py and scripts/gpu/bench.py one after another, in the background, under one deadline, so
# that later device calls only poll. Run from the tree that travelled (scripts/gpu/snapshot.sh makes it).
#   start:  bash scripts/gpu/run_h200.sh start [DEADLINE_S] [STEP...]   (default 1050 s; steps below)
#   poll:   bash scripts/gpu/run_h200.sh poll    (steps so far; everything as $OUT/h200-results.tgz)
# Steps, in order of what the issues need most: prepare dummy8b latency app embedded goals. One session's
# 24 device minutes do not hold them all (2026-12-01): name a subset, e.g. `start 1300 prepare dummy8b latency`.
set -u
results=/tmp/h200-results
case "${1:-}" in
start)
  deadline_s=${2:-1050}
  rm -rf /tmp/repo "$results" && mkdir -p "$results" && cp -r . /tmp/repo
  cat > /tmp/h200-driver.sh <<DRIVER
cd /tmp/repo
started=\$(date +%s)
source /tmp/stage/install.sh > $results/install.log 2>&1 || { echo "install failed" >> $results/steps.log; exit 1; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
echo "\$(date +%T) installed in \$((\$(date +%s) - started)) s" >> $results/steps.log
python3 -c "import torch, vllm, transformers, gradio; print(torch.__version__, vllm.__version__, transformers.__version__, gradio.__version__, torch.cuda.get_device_name())" >> $results/steps.log 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv >> $results/steps.log 2>&1
wanted="${*:3}"
left() { echo \$(( $deadline_s - (\$(date +%s) - started) )); }
step() { name=\$1; limit=\$2; shift 2
  if [ -n "\$wanted" ] && [[ " \$wanted " != *" \$name "* ]]; then return; fi
  remaining=\$(left); if [ \$remaining -lt 60 ]; then echo "\$(date +%T) skip \$name (deadline)" >> $results/steps.log; return; fi
  [ \$limit -gt \$remaining ] && limit=\$remaining
  echo "\$(date +%T) start \$name (limit \$limit s)" >> $results/steps.log
  BUDGET_S=\$((limit - 30)) timeout -k 10 \$limit "\$@" > $results/\$name.log 2>&1
  echo "\$(date +%T) end \$name rc=\$? (\$(left) s left)" >> $results/steps.log
  # GPU processes whose parent is gone (vLLM engine cores of a killed step) are this driver's own leftovers.
  for p in \$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do
    [ "\$(ps -o ppid= -p \$p | tr -d ' ')" = 1 ] && kill -9 \$p && echo "killed orphaned GPU process \$p" >> $results/steps.log
  done; }
# The embedded model's checkpoint and the dummy shape's folder, once, outside any engine's time limit: on the
# H200 (2026-12-01) the first engine process spent about 3 minutes converting the GGUF before vLLM started.
step prepare 240 python3 -c "from engines.models.sources import resolve_model; [print(resolve_model(n).path) for n in (None, 'dummy:llama-3-8b')]"
step dummy8b 540 bash -c 'python3 scripts/gpu/bench.py --suite dummy --engines vllm[max_num_seqs=16],vllm-int4[max_num_seqs=16],bf16-compiled,vllm-fp8kv[max_num_seqs=16] --max-new-tokens 256 --prompt-tokens 512 --repeats 3 --engine-timeout-s 200 --total-budget-s \$((BUDGET_S - 20)) --out $results/bench-dummy'
step latency 180 bash -c 'python3 scripts/gpu/h200.py latency --out $results --budget-s \$BUDGET_S'
step app 600 bash -c 'python3 scripts/gpu/h200.py app --repeats 2 --out $results --budget-s \$BUDGET_S'
step embedded 600 bash -c 'python3 scripts/gpu/bench.py --suite embedded --engines bf16,bf16-compiled,spec,gptq-int4[backend=gptq_triton],nf4,int8,vllm[max_num_seqs=16],vllm-fp8kv[max_num_seqs=16],vllm-spec[max_num_seqs=16],vllm-int4[max_num_seqs=16] --max-new-tokens 128 --prompt-tokens 512 --repeats 2 --engine-timeout-s 150 --total-budget-s \$((BUDGET_S - 20)) --out $results/bench-embedded'
python3 scripts/gpu/h200.py goals --out $results > $results/goals.log 2>&1
echo "\$(date +%T) all done" >> $results/steps.log
DRIVER
  setsid nohup bash /tmp/h200-driver.sh > /tmp/h200-driver.out 2>&1 < /dev/null &
  echo "started (deadline ${deadline_s} s); steps log: $results/steps.log" ;;
poll)
  cat "$results/steps.log" 2>/dev/null
  current=$(ls -t "$results"/*.log 2>/dev/null | head -1)
  [ -n "$current" ] && { echo "--- tail of $current"; tail -c 1500 "$current"; }
  mkdir -p "${OUT:-/tmp/out}"
  tar czf "${OUT:-/tmp/out}/h200-results.tgz" -C "$results" . 2>/dev/null
  echo "--- GPU: $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader)" ;;
*) echo "usage: run_h200.sh start [DEADLINE_S] [STEP...] | poll" >&2; exit 2 ;;
esac
