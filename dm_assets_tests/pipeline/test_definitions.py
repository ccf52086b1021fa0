"""The real Dagster webserver loads ``workspace.yaml``: the asset nodes, their groups and
partitions, and the jobs, as its GraphQL API serves them to the UI, including an experiment the
user added with ``$DM_EXPERIMENTS``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dm_assets_tests.helpers import REPO_ROOT, cli_env

WEBSERVER = Path(sys.executable).parent / "dagster-webserver"
START_TIMEOUT = 90.0

USER_EXPERIMENT = """
name: orch_webui
description: a user's experiment, added with DM_EXPERIMENTS
spec:
  num_models: 12
  schema:
    masks: {shape: [6], dtype: bool_}
    margins: {shape: [2], dtype: float32}
trainer:
  main_import: dm_assets_tests.scripts.planted_failing
models_per_partition: 4
devices: {gpus: none, cpu_workers: 1}
"""

QUERY = """
query {
  assetNodes {
    assetKey { path }
    groupName
    isPartitioned
    partitionKeysByDimension { name partitionKeys }
  }
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError {
          __typename
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name jobs { name isAssetJob } } }
    ... on PythonError { message }
  }
}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _output(log: Path) -> str:
    return log.read_text(errors="replace")[-8000:] if log.exists() else "(no output)"


def _wait_until_up(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"dagster-webserver exited {proc.returncode} while starting:\n{_output(log)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"dagster-webserver did not answer in {START_TIMEOUT:g} s:\n{_output(log)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (the webserver and its code server), then SIGKILL
    whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)


@pytest.fixture
def webserver(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A running ``dagster-webserver`` on 127.0.0.1 and its output log."""
    if not WEBSERVER.exists():
        pytest.skip(f"{WEBSERVER} is not installed")
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    shutil.copyfile(REPO_ROOT / "dm_assets" / "dagster.yaml", dagster_home / "dagster.yaml")
    experiment = tmp_path / "orch_webui.yaml"
    experiment.write_text(textwrap.dedent(USER_EXPERIMENT))
    env = cli_env()
    env.update(
        DAGSTER_HOME=str(dagster_home),
        DM_HOME=str(tmp_path / "home"),
        DM_EXPERIMENTS=str(experiment),
    )
    port = _free_port()
    log = tmp_path / "webserver.log"
    command = [str(WEBSERVER), "-h", "127.0.0.1", "-p", str(port)]
    command += ["-w", str(REPO_ROOT / "workspace.yaml")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(proc, url, log)
        yield url, log
    finally:
        _stop(proc)


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body["errors"]
    return body["data"]


@pytest.mark.slow
def test_webserver_serves_the_experiments_assets_and_jobs(webserver: tuple[str, Path]) -> None:
    url, log = webserver
    data = _graphql(url, QUERY)

    workspace = data["workspaceOrError"]
    assert workspace["__typename"] == "Workspace", workspace
    for entry in workspace["locationEntries"]:
        loaded = entry["locationOrLoadError"]
        assert loaded is not None, f"code location {entry['name']} not loaded:\n{_output(log)}"
        assert loaded["__typename"] == "RepositoryLocation", (
            f"code location {entry['name']} failed to load: {loaded}"
        )

    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    minimal = {key: node for key, node in nodes.items() if key.startswith("minimal/")}
    # the training and fitting assets (later stages, such as an evaluation, may follow)
    assert {
        "minimal/store",
        "minimal/model_outputs",
        "minimal/regression_dataset",
        "minimal/datamodels",
    } <= set(minimal)
    assert {node["groupName"] for node in minimal.values()} == {"minimal"}
    partitioned = {key for key, node in minimal.items() if node["isPartitioned"]}
    assert partitioned == {"minimal/model_outputs"}
    (dimension,) = minimal["minimal/model_outputs"]["partitionKeysByDimension"]
    assert dimension["partitionKeys"] == [
        "000-049",
        "050-099",
        "100-149",
        "150-199",
        "200-249",
        "250-299",
    ]

    # the user's experiment (no regression section): the training half of the graph only
    user = {key: node for key, node in nodes.items() if key.startswith("orch_webui/")}
    assert set(user) == {"orch_webui/store", "orch_webui/model_outputs"}
    assert {node["groupName"] for node in user.values()} == {"orch_webui"}
    (dimension,) = user["orch_webui/model_outputs"]["partitionKeysByDimension"]
    assert dimension["partitionKeys"] == ["00-03", "04-07", "08-11"]

    repositories = data["repositoriesOrError"]
    assert repositories["__typename"] == "RepositoryConnection", repositories
    jobs = {job["name"] for repo in repositories["nodes"] for job in repo["jobs"]}
    assert {"minimal_train", "minimal_fit", "minimal_all"} <= jobs
    assert "orch_webui_train" in jobs
    assert "synthetic_all" in jobs and "seed_minimal_train" in jobs


def test_the_shipped_experiments_can_be_left_out(tmp_path: Path) -> None:
    experiment = tmp_path / "orch_webui.yaml"
    experiment.write_text(textwrap.dedent(USER_EXPERIMENT))
    env = cli_env()
    env.update(
        DM_HOME=str(tmp_path / "home"),
        DM_EXPERIMENTS=str(experiment),
        DM_SHIPPED_EXPERIMENTS="0",
    )
    script = (
        "import json\n"
        "from dm_assets.pipeline.definitions import defs\n"
        "graph = defs.resolve_asset_graph()\n"
        "keys = sorted(k.to_user_string() for k in graph.get_all_asset_keys())\n"
        "print(json.dumps(keys))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    keys = json.loads(proc.stdout.strip().splitlines()[-1])
    assert keys, proc.stdout
    assert all(key.startswith("orch_webui/") for key in keys), keys


def _imported_distributions() -> dict[str, list[str]]:
    """Every third-party module ``dm_assets`` imports (at any depth of its code), with the
    installed distributions that provide it."""
    import ast
    import importlib.metadata
    import sys

    modules: set[str] = set()
    for path in (REPO_ROOT / "dm_assets").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= {*sys.stdlib_module_names, "dm_assets"}
    providers = importlib.metadata.packages_distributions()
    return {module: providers.get(module, []) for module in sorted(modules)}


def undeclared_imports(pyproject: str) -> list[str]:
    """The modules ``dm_assets`` imports that no dependency of ``pyproject`` (its text)
    provides."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    declared = {
        canonicalize_name(Requirement(text).name)
        for text in tomllib.loads(pyproject)["project"]["dependencies"]
    }
    return [
        module
        for module, distributions in _imported_distributions().items()
        if not declared & {canonicalize_name(d) for d in distributions}
    ]


def test_every_imported_package_is_declared_and_pinned() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert undeclared_imports(pyproject) == []
    # and every declared dependency is pinned in the lock file the set-up script installs
    pinned = {
        canonicalize_name(line.split("==")[0])
        for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    for text in tomllib.loads(pyproject)["project"]["dependencies"]:
        assert canonicalize_name(Requirement(text).name) in pinned, text
