#!/usr/bin/env bash
# A/B of the 0.2 core (/work/oldcore: main's tools, 0.2's core files) and the 0.3 core (/work/main),
# in alternating processes, SD 1.5's first attention level at 1024², agent and ToMe phases.
cd /tmp/ab
for i in 1 2 3; do
  for side in old new; do
    root=/work/main; [[ $side == old ]] && root=/work/oldcore
    echo "=== $side $i $(date -u +%H:%M:%S)"
    PYTHONPATH=$root python -m agentsd bench --random-weights --arch /tmp/ab/sd15-level1.json \
      --resolution 1024 --batch-size 1 --methods agentsd-agent:0.4 agentsd-tome:0.4 --repeats 2 \
      --out /tmp/ab/$side-$i --no-progress 2>&1 | grep -E "^\|" 
  done
done
echo "=== done $(date -u +%H:%M:%S)"
