#!/usr/bin/env bash
# A/B of the 0.2 core and the 0.3 core in alternating processes: SD 1.5's first attention level
# (sd15-level1.json, beside this script) at 1024², agent and ToMe phases, random weights.
# /work/main: the 0.3 tree; /work/oldcore: the same tree with agentsd/{patch,attention,merge,state}.py
# as before the core-0.3 merge (git checkout a32f33e^1 -- agentsd/{patch,attention,merge,state}.py),
# so only the core differs.
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/ab && cd /tmp/ab
for i in 1 2 3; do
  for side in old new; do
    root=/work/main; [[ $side == old ]] && root=/work/oldcore
    echo "=== $side $i $(date -u +%H:%M:%S)"
    PYTHONPATH=$root python -m agentsd bench --random-weights --arch $here/sd15-level1.json \
      --resolution 1024 --batch-size 1 --methods agentsd-agent:0.4 agentsd-tome:0.4 --repeats 2 \
      --out /tmp/ab/$side-$i --no-progress 2>&1 | grep -E "^\|" 
  done
done
echo "=== done $(date -u +%H:%M:%S)"
