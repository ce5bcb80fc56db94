"""Check the demo's last line (the JSON result contract) against the walking skeleton's acceptance."""

import json
import sys

result = json.loads(sys.stdin.read())
print("demo:", result)
val_top1 = result["val_top1"]
assert val_top1 >= 0.90, f"demo val_top1 {val_top1} < 0.90"
# the registered model, loaded back through mlflow.pyfunc, names the class of videos it never saw
correct, total = result["heldout_correct"], result["heldout_videos"]
assert total > 0 and correct / total >= 0.85, f"registered model got {correct}/{total} held-out videos right"
