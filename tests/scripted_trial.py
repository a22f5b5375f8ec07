"""A search trial with scripted dev scores: `python scripted_trial.py -m squad_ds.train TRAIN_ARGS...`, given to
`squad-ds search --launcher "python tests/scripted_trial.py"`.

$SCRIPTED_TRIAL_SCORES is JSON {trial number: [F1 of the 1st evaluation, the 2nd, ...]}; the trial's number is read
from its output.dir (…/trial-NNNN). Every evaluation runs for real; its F1 is replaced by the next scripted value, in
what the loop sees and in the eval_results.json the search reads. A trial not named keeps its real scores.
$SCRIPTED_TRIAL_PAUSE_S (default 0): seconds to wait after each scripted evaluation, as a real trial's next steps
take time; a tiny model's would otherwise end before the search has read the score and could stop it.
"""
import json
import os
import re
import sys
import time
from pathlib import Path

from squad_ds import atomic, train

args = sys.argv[1:]
if args[:2] != ["-m", "squad_ds.train"]:
    sys.exit(f"usage: {sys.argv[0]} -m squad_ds.train TRAIN_ARGS...")
args = args[2:]
number = next(int(m.group(1)) for a in args if (m := re.search(r"output\.dir=.*trial-(\d+)$", a)))
scores = list(json.loads(os.environ["SCRIPTED_TRIAL_SCORES"]).get(str(number), []))
real_evaluate = train._evaluate


def _evaluate(loop, trim, out_dir):
    metrics = real_evaluate(loop, trim, out_dir)
    if scores:
        metrics = {**metrics, "f1": scores.pop(0)}
        atomic.write_text(Path(out_dir) / "eval_results.json", json.dumps(metrics, indent=2) + "\n")
        time.sleep(float(os.environ.get("SCRIPTED_TRIAL_PAUSE_S", "0")))
    return metrics


train._evaluate = _evaluate
sys.exit(train.main(args))
