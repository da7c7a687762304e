"""The federation through Prefect deployments, as README "way 3" runs it: a real Prefect server, each
machine's clone deploying only its own deployment and running its own worker, the deployments run in
order public → owners (at the same time) → central; then every worker stops on SIGTERM. Slow (≈4 min):
`make test-all` runs it; `make test` runs the same federation through the flow functions
(tests/flows/test_federation.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import federation_origin, git_clone, owner_clone, public_built_as_dvc_would, sh, tree

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_env(home: Path, api: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1")
    return env


def prefect(cwd: Path, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _deployments_for_tiny_owners(root: Path) -> None:
    """prefect.yaml's owner deployments are per default owner: give the tiny project's owners theirs."""
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    template = next(d for d in spec["deployments"] if d["name"].startswith("owner-"))
    spec["deployments"] = [d for d in spec["deployments"] if not d["name"].startswith("owner-")]
    for owner in ("alpha", "beta"):
        spec["deployments"].append({**template, "name": f"owner-{owner}",
                                    "parameters": {"owner": owner, "root": "."},
                                    "work_pool": {"name": f"owner-{owner}"}})
    (root / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _prefect_env(home, api)
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the Prefect server did not start in 180 s")
    yield env
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_the_federation_runs_as_deployments_from_each_clone(tiny_project, tmp_path, server):
    env = server
    dvc_remote = tmp_path / "dvc-remote"
    origin = federation_origin(tiny_project.root, tmp_path / "origin", dvc_remote)
    _deployments_for_tiny_owners(origin)
    sh(origin, "git", "commit", "-qam", "deployments of the tiny owners")
    remote = tmp_path / "remote.git"
    sh(tmp_path, "git", "clone", "-q", "--bare", str(origin), str(remote))
    central = git_clone(remote, tmp_path / "central")
    public_built_as_dvc_would(tiny_project.root, central)
    owners = {o: owner_clone(remote, tmp_path / o, tiny_project, o) for o in ("alpha", "beta")}

    pools = {"flexo-central": central, "owner-alpha": owners["alpha"], "owner-beta": owners["beta"]}
    for pool in pools:
        prefect(tmp_path, env, "work-pool", "create", pool, "--type", "process")
    # Each machine deploys only its own deployment, from its own clone.
    prefect(central, env, "deploy", "--name", "public")
    prefect(central, env, "deploy", "--name", "central")
    for owner, clone in owners.items():
        prefect(clone, env, "deploy", "--name", f"owner-{owner}")
    logs = {pool: open(tmp_path / f"worker-{pool}.log", "w") for pool in pools}
    workers = {pool: subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool], cwd=clone, env=env,
                                      stdout=logs[pool], stderr=subprocess.STDOUT)
               for pool, clone in pools.items()}
    worker_logs = lambda: "\n".join(f"--- {p}\n" + (tmp_path / f"worker-{p}.log").read_text()[-4000:]  # noqa: E731
                                     for p in pools)
    try:
        r = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deployment", "run", "flexo-public/public", "--watch"],
                           cwd=central, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, worker_logs()
        runs = [subprocess.Popen([str(BIN / "prefect"), "--no-prompt", "deployment", "run",
                                  f"flexo-owner/owner-{o}", "--watch"], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for o in owners]
        for r in runs:
            out, _ = r.communicate(timeout=900)
            assert r.returncode == 0, out[-3000:]
        prefect(central, env, "deployment", "run", "flexo-central/central", "--watch", timeout=900)
    finally:
        stopped = {}
        for pool, worker in workers.items():
            worker.send_signal(signal.SIGTERM)
        for pool, worker in workers.items():
            t0 = time.time()
            try:
                worker.wait(timeout=30)
                stopped[pool] = round(time.time() - t0, 1)
            except subprocess.TimeoutExpired:
                worker.kill()
                stopped[pool] = None
    assert all(v is not None for v in stopped.values()), f"workers that ignored SIGTERM for 30 s: {stopped}"
    print(f"\nworkers stopped on SIGTERM after (s): {stopped}")

    # Each flow ran in its own machine's clone: the owners' packages in theirs, the merge at the centre.
    for owner, clone in owners.items():
        assert (clone / "published" / owner / "package.dvc").is_file()
        assert (clone / "models" / "experts" / owner / "model").is_dir()
        assert not (central / "models" / "experts" / owner / "model").exists()
    assert json.loads((central / "models" / "merged" / "flexo.json").read_text())["experts"] == ["public", "alpha", "beta"]
    for rel in ("models/merged",):
        assert tree(central / rel)  # written there, nowhere else
        assert not any((clone / rel).exists() for clone in owners.values())
