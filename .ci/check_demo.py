"""Check the demo's output: its last line (the JSON result contract) against the walking skeleton's
acceptance, and the whole output against third-party noise a user cannot act on."""

import json
import re
import sys

lines = open(sys.argv[1]).read().splitlines()
# the result line is the demo's last stdout line; stderr (interleaved in the log) may follow it
result = next(json.loads(line) for line in reversed(lines) if line.startswith("{") and '"val_top1"' in line)
print("demo:", result)
val_top1 = result["val_top1"]
assert val_top1 >= 0.90, f"demo val_top1 {val_top1} < 0.90"
# the registered model, loaded back through mlflow.pyfunc, names the class of videos it never saw
correct, total = result["heldout_correct"], result["heldout_videos"]
assert total > 0 and correct / total >= 0.85, f"registered model got {correct}/{total} held-out videos right"
# the same list as tests/integration/test_readme.py: lines users saw and could do nothing about
noise = ("PreemptionWatcher", "Checkpoint successfully created", "CloudPickle", "torch.jit.script")
noisy = [line for line in lines if any(n in line for n in noise)]
assert not noisy, f"the demo printed third-party noise: {noisy[:3]}"
unrounded = [line for line in lines if line.startswith("[") and "]" in line
             and re.search(r"\d\.\d{7,}", line.split("]", 1)[1])]
assert not unrounded, f"the demo printed unrounded metrics: {unrounded[:3]}"
