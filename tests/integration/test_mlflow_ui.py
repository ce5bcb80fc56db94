"""The MLflow UI's compare page, rendered by headless Chromium, shows two runs of the synthetic workflow
(the first run and the one with a changed training key) with their val/top1. The screenshot is kept
as a test artifact under test-artifacts/; the assertions read the rendered DOM."""

from __future__ import annotations

import html
import json
import re
import subprocess
import urllib.parse
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--virtual-time-budget=20000",
]


def render(chromium: str, url: str, profile: Path, *output_flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *output_flags, url],
                          capture_output=True, text=True, timeout=180, check=False)


def visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL | re.IGNORECASE)
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


def metrics_table(dom: str) -> dict[str, list[str]]:
    """The compare page's Metrics section as {metric name: [cell text per run column]}.

    The section is two react-virtualized grids: metric names (one row per metric, positioned by `top`) and
    values (cells positioned by `left` = column * width and `top` = row)."""
    start = dom.index(">Metrics</div>")
    end = dom.find(">Artifacts</div>", start)
    grids = dom[start:end if end > 0 else None].split('class="ReactVirtualized__Grid"')
    assert len(grids) >= 3, "the Metrics section has no name/value grids"
    names = {int(top): html.unescape(name)
             for top, name in re.findall(r'top: (\d+)px; width: \d+px;"><a [^>]*>([^<]+)<', grids[1])}
    table: dict[str, dict[int, str]] = {}
    cells = re.findall(r'left: (\d+)px; position: absolute; top: (\d+)px; width: (\d+)px;"><span[^>]*>([^<]*)<', grids[2])
    for left, top, width, text in cells:
        table.setdefault(names[int(top)], {})[int(left) // int(width)] = html.unescape(text)
    return {name: [columns[c] for c in sorted(columns)] for name, columns in table.items()}


def test_compare_page_shows_both_workflow_runs_with_val_top1(synthetic_workflow, services, chromium, tmp_path):
    invocations = synthetic_workflow["invocations"]
    run_ids = [invocations["first"]["summary"]["mlflow_run_id"],
               invocations["train_key_changed"]["summary"]["mlflow_run_id"]]
    client = mlflow.MlflowClient(services.mlflow_uri)
    runs = [client.get_run(run_id) for run_id in run_ids]
    experiment_ids = sorted({run.info.experiment_id for run in runs})
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps(experiment_ids)})
    url = f"{services.mlflow_uri}/#/compare-runs?{query}"

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow_compare_runs.png"
    screenshot.unlink(missing_ok=True)
    shot = render(chromium, url, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1400,1000")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000

    dumped = render(chromium, url, tmp_path / "profile-dom", "--dump-dom", "--window-size=1400,1000")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    (ARTIFACTS / "mlflow_compare_runs.html").write_text(dumped.stdout)
    text = visible_text(dumped.stdout)
    assert "Comparing 2 Runs" in text, text[:2000]
    assert "val/top1" in text
    # the run-details header lists the runs in the order asked for; the metric columns follow it
    assert text.index(run_ids[0]) < text.index(run_ids[1])
    for run in runs:
        assert run.info.run_name in text, f"run name {run.info.run_name} not on the page"
    table = metrics_table(dumped.stdout)
    shown = table.get("val/top1")
    assert shown is not None and len(shown) == 2, f"val/top1 row with a value per run expected, got {table}"
    for run, cell in zip(runs, shown):
        # the page rounds to a few significant digits
        assert float(cell) == pytest.approx(run.data.metrics["val/top1"], rel=5e-3, abs=5e-4), (run.info.run_name, cell)
    assert runs[0].info.run_name != runs[1].info.run_name
