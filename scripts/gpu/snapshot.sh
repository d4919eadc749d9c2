#!/usr/bin/env bash
# Here, before the device calls: the tree that travels to the GPU machine, written to .gpu-carry/tree (git-
# ignored: make_bundle.py puts /.gpu-carry/ in .git/info/exclude). It is the committed HEAD plus this
# session's GPU files, so that other engineers' uncommitted edits in the shared checkout never reach a
# measurement half-made; .gpu-carry/tree/SNAPSHOT names the commit. Carry it with the last bundle part:
#   run  command="bash .gpu-carry/p11/stage.sh && cd .gpu-carry/tree && bash scripts/gpu/run_h200.sh start"
#        carry=[".gpu-carry/p11", ".gpu-carry/tree"]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tree=.gpu-carry/tree
rm -rf "$tree" && mkdir -p "$tree"
git archive HEAD | tar x -C "$tree"
own=(scripts/gpu engines/variants/vllm/int4.py tests/gpu tests/test_vllm_int4.py)
for path in "${own[@]}"; do
  [ -e "$path" ] || continue
  rm -rf "${tree:?}/$path" && mkdir -p "$(dirname "$tree/$path")" && cp -r "$path" "$tree/$path"
done
# The registry at HEAD, with this session's SPECS entry appended when HEAD lacks it.
if ! grep -q '"vllm-int4"' "$tree/engines/registry.py"; then
  python3 - "$tree/engines/registry.py" engines/registry.py <<'EOF'
import re, sys
head_path, work_path = sys.argv[1], sys.argv[2]
work = open(work_path).read()
entry = re.search(r'\n    EngineSpec\("vllm-int4".*?if key in EngineSpec.__dataclass_fields__\}\),\n', work, re.S).group(0)
head = open(head_path).read()
marker = "\n]}\n"
index = head.index(marker)
open(head_path, "w").write(head[:index] + entry.rstrip("\n") + head[index:])
EOF
fi
find "$tree" -name __pycache__ -prune -exec rm -rf {} +
echo "$(git rev-parse HEAD) + ${own[*]}" > "$tree/SNAPSHOT"
du -sh "$tree" | sed 's/^/snapshot: /'
