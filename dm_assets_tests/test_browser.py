"""End to end in a real browser: the Dagster UI and the MLflow UI, served by
``python -m dm_assets.ui dagster|mlflow`` on 127.0.0.1 into a fresh ``DM_HOME``, driven by
headless Chromium (Debian's ``chromium`` through Playwright's ``executable_path``) as a user
clicks them.

The user's path: the ``minimal`` asset group, **Materialize all…**, **All** partitions,
**Launch backfill**, the backfill's page until it shows *Succeeded* with every asset 100%
completed; then the ``datamodels`` asset's ``mlflow_run`` link, which opens the fit's run in
the MLflow UI, whose **Model metrics** tab draws ``path/mean_val_mse`` as a line with one point
per lambda step (as many as the run's metric history holds).

Both UIs listen on free ports; the Dagster UI is told the MLflow UI's (``--mlflow-port``), so
the link opens the test's MLflow UI as a user's opens theirs.

Without Chromium or Playwright the test fails when ``CI`` is set (``make test`` runs
``scripts/setup.sh``, which installs both) and is skipped otherwise, naming what to install.
Deselect it with ``-m "not browser"``. On 2 cores under a load of 10-15 it took 4-4.5
minutes: the Dagster UI's start 45 s, the backfill 2 min (three runs, each started on a
30-second tick of the daemon that ``dagster dev`` runs), the MLflow run page 15-30 s. On
failure, screenshots of every open tab are written to the test's ``tmp_path`` and the servers'
log tails are added to the error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dm_assets.pipeline.runs import job_partition_keys
from dm_assets_tests.helpers import REPO_ROOT, cli_env

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EXPERIMENT = "minimal"
PER_LAMBDA_METRIC = "path/mean_val_mse"
LOCATION = "dm_assets.pipeline.definitions"  # the code location workspace.yaml loads
START_TIMEOUT = 240.0  # seconds for both servers to answer (MLflow starts 4 workers)
BACKFILL_TIMEOUT = 420.0  # the whole group: three runs, each started by the daemon
UI_TIMEOUT_MS = 120_000  # for a page element (MLflow's run page takes 30 s on 2 busy cores)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _chromium_or_skip() -> str:
    """The Chromium executable; without it or Playwright, fail in CI and skip elsewhere."""
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (.venv/bin/pip install -r requirements.lock)")
    executable = shutil.which("chromium")
    if executable is None:
        missing.append("Debian's chromium (apt-get install chromium)")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}; scripts/setup.sh installs both"
        if _in_ci():
            pytest.fail(f"{message} (CI is set, so this is a failure)", pytrace=False)
        pytest.skip(message)
    assert executable is not None
    return executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextlib.contextmanager
def _serve(commands: dict[str, Path], env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Start ``python -m dm_assets.ui <which> --port <free port>`` for each ``which -> log``,
    each in its own process group; yield ``which -> base URL`` (on 127.0.0.1). On exit, whatever
    happened, every group (webserver, daemon and code servers; MLflow's workers) gets SIGTERM
    (not SIGINT, which a process started in the background may inherit as ignored), then
    SIGKILL for whatever is left after 20 s (``dagster dev`` takes about 10 s)."""
    procs: list[subprocess.Popen[bytes]] = []
    urls = {}
    try:
        ports = {which: _free_port() for which in commands}
        for which, log in commands.items():
            port = ports[which]
            # the Dagster metadata's links open the test's MLflow UI, as a user's open theirs
            extra = ["--mlflow-port", str(ports["mlflow"])] if which == "dagster" else []
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "dm_assets.ui", which, "--port", str(port), *extra],
                        cwd=REPO_ROOT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            urls[which] = f"http://127.0.0.1:{port}"
        yield urls
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group's stragglers too
            proc.wait(timeout=10)


def _wait_until_up(name: str, url: str, log: Path, started: float) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail ``START_TIMEOUT`` seconds
    after ``started`` (a ``time.monotonic()``)."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > started + START_TIMEOUT:
            pytest.fail(f"{name} did not answer at {url} in {START_TIMEOUT:g} s:\n{_tail(log)}")
        time.sleep(1)


def _graphql(base: str, query: str, variables: dict) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body["errors"]
    return body["data"]


BACKFILL_QUERY = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs(limit: 100) { runId status } }
    ... on PythonError { message }
  }
}
"""


def _backfill_status(dagster: str, backfill_id: str) -> tuple[str, list[dict]]:
    found = _graphql(dagster, BACKFILL_QUERY, {"id": backfill_id})["partitionBackfillOrError"]
    assert found["__typename"] == "PartitionBackfill", found
    return found["status"], found["runs"]


def _metric_steps(mlflow: str, run_id: str, key: str) -> list[int]:
    url = f"{mlflow}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}"
    with urllib.request.urlopen(url, timeout=30) as response:
        history = json.loads(response.read()).get("metrics", [])
    return sorted(int(point["step"]) for point in history)


@contextlib.contextmanager
def _evidence_on_failure(
    context: BrowserContext, tmp_path: Path, logs: list[Path]
) -> Iterator[None]:
    """On an error: a screenshot of every open tab into ``tmp_path`` and the servers' log
    tails, both added to the error's notes."""
    try:
        yield
    except (Exception, pytest.fail.Exception) as error:  # pytest.fail's is a BaseException
        shots = []
        for i, page in enumerate(context.pages):
            path = tmp_path / f"failure-tab{i}.png"
            with contextlib.suppress(Exception):
                page.screenshot(path=str(path), full_page=True)
                shots.append(f"{path} ({page.url})")
        error.add_note("screenshots: " + (", ".join(shots) or "none could be taken"))
        for log in logs:
            error.add_note(f"--- {log.name} (tail) ---\n{_tail(log)}")
        raise


def _materialize_group_from_the_ui(page: Page, dagster: str, partitions: int) -> str:
    """Open the group, Materialize all…, All partitions, Launch backfill, View (the toast's
    link to the backfill's page); the backfill's id."""
    from playwright.sync_api import expect

    page.goto(f"{dagster}/locations/{LOCATION}/asset-groups/{EXPERIMENT}")
    page.get_by_role("button", name="Materialize all").click(timeout=UI_TIMEOUT_MS)
    dialog = page.get_by_role("dialog").filter(has_text=re.compile(r"Launch runs to materialize"))
    expect(dialog).to_contain_text(re.compile(r"Launch runs to materialize \d+ assets"))
    dialog.get_by_role("button", name="All", exact=True).click()
    expect(dialog).to_contain_text(f"{partitions} partitions selected")
    # the UI's instance queues its runs (dm_assets.pipeline.runs.prepare_ui_dagster_home): no
    # "... without a queued run coordinator is not advised" warning
    expect(dialog).not_to_contain_text("queued run coordinator")
    dialog.get_by_role("button", name="Launch backfill").click()
    toast = page.get_by_text(re.compile(r"Created backfill \w+"))
    expect(toast).to_be_visible(timeout=UI_TIMEOUT_MS)
    match = re.search(r"Created backfill (\w+)", toast.inner_text())
    assert match, toast.inner_text()
    page.get_by_text("View", exact=True).first.click()  # the toast's link to the backfill
    expect(page).to_have_url(re.compile(rf"/runs/b/{match.group(1)}\b"))
    return match.group(1)


def _wait_for_the_backfill(page: Page, dagster: str, backfill_id: str) -> None:
    """On the backfill's page, until its status reads Succeeded; GraphQL ends the wait early
    with the runs' statuses when the backfill ends otherwise."""
    from playwright.sync_api import expect

    status = page.locator("[class*=BackfillOverviewDetails_label]", has_text="Status")
    status_tag = status.locator("xpath=following-sibling::*[1]")
    deadline = time.monotonic() + BACKFILL_TIMEOUT
    while True:
        state, runs = _backfill_status(dagster, backfill_id)
        if state == "COMPLETED_SUCCESS":
            break
        if state != "REQUESTED":  # FAILING, FAILED, COMPLETED_FAILED, CANCELING, CANCELED
            pytest.fail(f"backfill {backfill_id} is {state}; its runs: {runs}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"backfill {backfill_id} still {state} after {BACKFILL_TIMEOUT:g} s: {runs}"
            )
        time.sleep(3)
    # what the user sees: the page refreshes itself (Dagster polls every few seconds)
    expect(status_tag).to_have_text("Succeeded", timeout=UI_TIMEOUT_MS)


def _assets_all_completed(page: Page) -> list[str]:
    """Every asset row of the backfill's page reads 100% completed; their asset paths."""
    from playwright.sync_api import expect

    links = page.locator(f"a[href^='/assets/{EXPERIMENT}/']")
    expect(links.first).to_be_visible()
    assets = sorted({link.get_attribute("href") or "" for link in links.all()})
    for href in assets:
        row = page.locator("[class*=VirtualizedTable_row]").filter(
            has=page.locator(f"a[href='{href}']")
        )
        expect(row).to_contain_text("100% completed")
    return assets


def _open_mlflow_run_from_datamodels(
    page: Page, context: BrowserContext, mlflow: str
) -> tuple[Page, str]:
    """Click the datamodels asset, then its ``mlflow_run`` link; the new tab and the run id."""
    from playwright.sync_api import expect

    page.locator(f"a[href='/assets/{EXPERIMENT}/datamodels']").first.click()
    row = page.get_by_role("row").filter(
        has=page.get_by_role("cell", name="mlflow_run", exact=True)
    )
    link = row.get_by_role("link").first
    expect(link).to_be_visible(timeout=UI_TIMEOUT_MS)
    href = link.get_attribute("href") or ""
    match = re.fullmatch(re.escape(mlflow) + r"/#/experiments/\d+/runs/([0-9a-f]{32})", href)
    assert match, f"mlflow_run links to {href!r}, not a run page of {mlflow}"
    with context.expect_page() as opened:
        link.click()
    tab = opened.value
    return tab, match.group(1)


def _expect_per_lambda_chart(tab: Page, steps: int) -> None:
    """The run's Model metrics tab draws ``PER_LAMBDA_METRIC`` as a line of ``steps`` points."""
    from playwright.sync_api import expect

    tab.get_by_role("tab", name="Model metrics").click(timeout=UI_TIMEOUT_MS)
    tab.get_by_placeholder("Search metric charts").fill(PER_LAMBDA_METRIC)
    card = tab.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=tab.locator(f"h4[title='{PER_LAMBDA_METRIC}']")
    )
    expect(card).to_have_count(1, timeout=UI_TIMEOUT_MS)
    plot = card.locator("svg.main-svg").first
    expect(plot).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(card).to_contain_text("Step")  # the x axis: the lambda path's index
    line = card.locator("g.trace.scatter").filter(has=tab.locator("path.point")).first
    expect(line.locator("path.point")).to_have_count(steps, timeout=UI_TIMEOUT_MS)


@pytest.mark.timeout(900)
def test_materialize_the_minimal_group_from_the_ui_and_see_its_per_lambda_chart(
    tmp_path: Path,
) -> None:
    chromium = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    partitions = len(job_partition_keys()[f"{EXPERIMENT}_all"])
    env = cli_env()
    for name in ("DAGSTER_HOME", "DM_EXPERIMENTS", "DM_SHIPPED_EXPERIMENTS"):
        env.pop(name, None)  # the instance in DM_HOME/dagster, the shipped experiments
    env["DM_HOME"] = str(tmp_path / "home")
    logs = {"dagster": tmp_path / "dagster.log", "mlflow": tmp_path / "mlflow.log"}
    started = time.monotonic()
    with _serve(logs, env) as urls:
        dagster, mlflow = urls["dagster"], urls["mlflow"]
        _wait_until_up("the Dagster UI", f"{dagster}/server_info", logs["dagster"], started)
        # Dagster's one-off "Join the Dagster community" dialog opens a second after a page
        # loads, over whatever dialog is open then; a user dismisses it once, as this does
        assert _graphql(dagster, "mutation { setNuxSeen }", {})["setNuxSeen"]
        with sync_playwright() as playwright:
            args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses root else
            browser = playwright.chromium.launch(executable_path=chromium, args=args)
            try:
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                # Dagster's one-off "Join the Dagster community" dialog, whenever it shows
                page.add_locator_handler(
                    page.get_by_text("Join the Dagster community"),
                    lambda: page.get_by_role("button", name="Skip").click(),
                )
                with _evidence_on_failure(context, tmp_path, list(logs.values())):
                    backfill_id = _materialize_group_from_the_ui(page, dagster, partitions)
                    _wait_for_the_backfill(page, dagster, backfill_id)
                    assets = _assets_all_completed(page)
                    assert {
                        f"/assets/{EXPERIMENT}/{name}"
                        for name in ("store", "model_outputs", "regression_dataset", "datamodels")
                    } <= set(assets), assets

                    # started with the Dagster UI; its 4 workers take a while on 2 busy cores
                    _wait_until_up("the MLflow UI", f"{mlflow}/health", logs["mlflow"], started)
                    tab, run_id = _open_mlflow_run_from_datamodels(page, context, mlflow)
                    steps = _metric_steps(mlflow, run_id, PER_LAMBDA_METRIC)
                    assert steps == list(range(len(steps))) and len(steps) >= 2, steps
                    _expect_per_lambda_chart(tab, len(steps))
            finally:
                browser.close()
