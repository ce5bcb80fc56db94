"""The README's copy-paste blocks run as written, so the README cannot drift from the code.

The `mvit` lines of the blocks marked `<!-- readme-test: ... -->` are read from README.md itself and run
in order (in this process, on the session's Ray) in a fresh directory with no MLflow variable exported.
The only changes are smaller sizes (SMALLER, appended overrides), and /tmp/mvit -> a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# Textual changes to the README's lines: a smaller synthetic set.
SMALLER = {"--classes 8": "--classes 4", "--videos-per-class 50": "--videos-per-class 6"}
# Overrides appended to a command (by its subcommand): a few steps of training on a few tiny shards.
APPENDED = {
    "preprocess": ["max_samples_per_shard=4"],
    "train": ["epochs=1", "batch_size=2"],
    "workflow": ["workflow.synthetic.classes=4", "workflow.synthetic.videos_per_class=6",
                 "preprocess.max_samples_per_shard=4", "train.epochs=1", "train.batch_size=2"],
}


def readme_commands(tag: str) -> list[list[str]]:
    """The `mvit ...` lines of the bash block after `<!-- readme-test: TAG`, without their comments."""
    text = README.read_text()
    start = text.index(f"<!-- readme-test: {tag}")
    body = text[text.index("```bash\n", start) + len("```bash\n"):]
    body = body[: body.index("```")]
    commands = []
    for line in body.splitlines():
        line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
        if line.startswith("mvit "):
            commands.append(shlex.split(line)[1:])
    assert commands, f"no mvit lines in the README block {tag!r}"
    return commands


def prepared(args: list[str], scratch: Path) -> list[str]:
    line = shlex.join(args).replace("/tmp/mvit", str(scratch))
    for old, new in SMALLER.items():
        line = line.replace(old, new)
    args = shlex.split(line)
    # after the positional arguments (the config and its overrides), before the first --option
    at = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    return [*args[:at], *APPENDED.get(args[0], []), *args[at:]]


@pytest.fixture
def fresh_directory(tmp_path, monkeypatch) -> Path:
    """A directory like a fresh clone (the repo's configs/), as the current directory, with no MLflow
    variable exported (the session's S3 endpoint stays: the blocks use local paths)."""
    workdir = tmp_path / "clone"
    workdir.mkdir()
    (workdir / "configs").symlink_to(REPO / "configs")
    for name in [n for n in os.environ if n.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(workdir)
    return workdir


def last_json_line(out: str, key: str) -> dict:
    """The command's result: the last line of its output that is a JSON object holding `key`."""
    for line in reversed(out.splitlines()):
        try:
            value = json.loads(line) if line.startswith("{") else None
        except ValueError:
            continue
        if isinstance(value, dict) and key in value:
            return value
    raise AssertionError(f"no JSON line with {key!r} in:\n{out[-2000:]}")


# Third-party lines a user cannot act on (issue: "quiet, honest output"); none may reach a command's output.
NOISE = ("PreemptionWatcher", "Checkpoint successfully created", "CloudPickle", "torch.jit.script")
# Our own log lines ("[train] ...", "[evaluate] ...") show metrics rounded; MLflow and results keep every digit.
UNROUNDED = re.compile(r"\d\.\d{7,}")


def assert_quiet(args: list[str], output: str) -> None:
    noisy = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, f"`mvit {shlex.join(args)}` printed third-party noise: {noisy[:3]}"
    unrounded = [line for line in output.splitlines()
                 if line.startswith("[") and "]" in line and UNROUNDED.search(line.split("]", 1)[1])]
    assert not unrounded, f"`mvit {shlex.join(args)}` printed unrounded metrics: {unrounded[:3]}"


@pytest.fixture
def run_ok(mvit_in_process):
    """`mvit ARGS` in this process; fails the test with the command's stderr if it exits non-zero, or if
    its output holds third-party noise or unrounded metrics."""

    def run(args: list[str]) -> str:
        code, out, err = mvit_in_process(args)
        assert code == 0, f"`mvit {shlex.join(args)}` exited {code}:\n{err[-3000:]}"
        assert_quiet(args, out + "\n" + err)
        return out

    return run


def test_the_local_block_runs_as_written_into_the_documented_store(fresh_directory, tmp_path, ray_session, run_ok):
    scratch = tmp_path / "mvit"
    outputs = {}
    for args in readme_commands("local"):
        args = prepared(args, scratch)
        outputs[args[0]] = run_ok(args)
    store = fresh_directory / ".state" / "mlflow" / "mlflow.db"
    assert store.is_file(), "runs are not in the documented local store"
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("mvit").experiment_id])
    assert {"val/top1", "eval/val/top1"} <= set(run.data.metrics)
    assert client.get_model_version_by_alias("mvit-demo", "champion").run_id == run.info.run_id
    prediction = json.loads(outputs["predict"].strip().splitlines()[-1])
    assert prediction["video"].endswith("right_speed1_0000.mp4") and len(prediction["top5_labels"]) == 4
    # nothing written beside the store: no ./mlflow.db, no ./mlruns
    assert sorted(p.name for p in fresh_directory.iterdir()) == [".state", "configs"]


def status_says(out: str) -> list[str]:
    """The assets `mvit workflow status` says the next run materializes."""
    return [line.split()[0] for line in out.splitlines() if " WILL RUN" in line]


def test_the_workflow_block_runs_as_written_and_status_predicts_each_run(fresh_directory, ray_session, run_ok):
    commands = [prepared(args, fresh_directory) for args in readme_commands("workflow")]
    predicted = None
    for args in commands:
        out = run_ok(args)
        if args[1] == "status":
            predicted = status_says(out)
            continue
        summary = last_json_line(out, "materialized")
        if predicted is not None:  # the line after `status` with the same arguments
            assert summary["materialized"] == predicted, (args, predicted, summary)
            predicted = None
    assert summary["materialized"] == ["evaluation"]  # the README's last line: --only evaluate --force

    # No change: status predicts nothing and run materializes nothing; a changed preprocess key: the
    # dataset and everything after it (a new dataset beside the old one, not a refusal).
    base = commands[0]
    for extra in ([], ["preprocess.short_side=36"]):
        predicted = status_says(run_ok(["workflow", "status", *base[2:], *extra]))
        summary = last_json_line(run_ok([*base, *extra]), "materialized")
        assert summary["materialized"] == predicted
    assert predicted == ["dataset", "checkpoint", "evaluation", "registered_model"]
    assert len(list((fresh_directory / ".state" / "workflow" / "datasets").iterdir())) == 2
