"""A real Hub-compatible HTTP server for tests: ``olah`` (MIT, on PyPI) serving local git repos, offline.

Use the session fixture ``hub_server`` by naming this module in a test module's (or the root conftest's)
``pytest_plugins = ["hub_server"]``: registered as a plugin, it starts one server for the whole session
(importing the fixture into several modules would start one per module)::

    sha = hub_server.publish("org/bank", folder, tag="v1")      # a git commit under the mirrors path
    res = hub_server.client(SCRIPT, cache_dir=tmp / "cache").result()  # a fresh Python, HF_ENDPOINT set

Clients must run in subprocesses: ``huggingface_hub`` reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` at import
time. olah answers downloads (``resolve``), ``/api/models/ORG/NAME/revision/REV`` and ``list_repo_refs`` for
branches, tags and commit shas; it does not accept uploads (405 on ``create_repo``), so upload paths stay
mocked. Unlike huggingface.co, an unknown revision of a known repo answers ``401 RepoNotFound``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 300.0
HEALTH_REPO = "wave-hf-tests/health"

#: The prelude of every client script: ``OUT`` (a folder for results), ``probe(name, fn)`` records
#: ``fn()``'s value or its exception; ``save(name, tensors)`` writes a safetensors file into ``OUT``.
CLIENT_PRELUDE = '''
import json, sys, time, traceback
from pathlib import Path

OUT = Path(sys.argv[1])
RESULT = {}


def probe(name, fn):
    start = time.monotonic()
    try:
        RESULT[name] = {"ok": True, "value": fn()}
    except Exception as err:  # recorded, the test decides
        RESULT[name] = {"ok": False, "type": type(err).__name__,
                        "mro": [c.__name__ for c in type(err).__mro__],
                        "message": str(err), "traceback": traceback.format_exc()}
    RESULT[name]["seconds"] = round(time.monotonic() - start, 3)


def save(name, tensors):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(OUT / f"{name}.safetensors"))
    return name
'''

CLIENT_EPILOGUE = '''
RESULT["_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("wave_hf", "transformers", "torch"))
(OUT / "result.json").write_text(json.dumps(RESULT, default=str))
'''


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as err:
        return f"(no log: {err})"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "wave-hf tests", "GIT_AUTHOR_EMAIL": "tests@wave-hf.invalid",
        "GIT_COMMITTER_NAME": "wave-hf tests", "GIT_COMMITTER_EMAIL": "tests@wave-hf.invalid",
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
    }
    res = subprocess.run(["git", "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args], cwd=cwd,
                         env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}:\n{res.stdout}{res.stderr}")
    return res.stdout.strip()


def client_env(endpoint: str, cache_dir: Path, home: Path, offline: bool = False) -> dict[str, str]:
    """The environment of a fresh Hub client: no inherited HF_* settings or tokens, this endpoint and cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_CACHE=str(cache_dir),
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        TRANSFORMERS_VERBOSITY="error", OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1",
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


class ClientRun:
    """A client script running in its own Python; ``result()`` waits and returns its probes."""

    def __init__(self, script: str, env: dict[str, str], out: Path, timeout: float):
        self.out = out
        self.timeout = timeout
        self.started = time.monotonic()
        out.mkdir(parents=True)
        (out / "client.py").write_text(CLIENT_PRELUDE + script + CLIENT_EPILOGUE)
        self._log = open(out / "client.log", "w")  # noqa: SIM115 (closed in result())
        self.proc = subprocess.Popen([sys.executable, str(out / "client.py"), str(out)], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=out)
        self._result: ClientResult | None = None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def result(self) -> ClientResult:
        if self._result is None:
            try:
                rc = self.proc.wait(max(1.0, self.timeout - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                rc = None
            finally:
                self._log.close()
            if rc != 0 or not (self.out / "result.json").is_file():
                pytest.fail(f"client {self.out} {'timed out' if rc is None else f'exited {rc}'}:\n"
                            f"{_tail(self.out / 'client.log')}")
            self._result = ClientResult(self.out, json.loads((self.out / "result.json").read_text()))
        return self._result


class ClientResult:
    def __init__(self, out: Path, probes: dict):
        self.out = out
        self.probes = probes

    @property
    def modules(self) -> list[str]:
        return self.probes["_modules"]

    def value(self, name: str):
        p = self.probes[name]
        assert p["ok"], f"probe {name!r} raised {p['type']}: {p['message']}\n{p['traceback']}"
        return p["value"]

    def error(self, name: str) -> dict:
        p = self.probes[name]
        assert not p["ok"], f"probe {name!r} did not raise; it returned {p['value']!r}"
        return p

    def tensors(self, name: str) -> dict:
        """The tensors the script wrote with ``save(name, ...)``."""
        from safetensors.torch import load_file

        return load_file(self.out / f"{name}.safetensors")


class HubServer:
    """olah on 127.0.0.1, offline, serving the git repos under ``mirrors/models/ORG/NAME``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.log = self.root / "olah.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.clients: list[ClientRun] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def unreachable_endpoint() -> str:
        """An endpoint where nothing listens (for clients that must not touch the network)."""
        return f"http://127.0.0.1:{free_port()}"

    # ---------------------------------------------------------------------------------- repos
    def repo_dir(self, repo_id: str) -> Path:
        org, name = repo_id.split("/")
        return self.mirrors / "models" / org / name

    def publish(self, repo_id: str, folder: str | os.PathLike, tag: str | None = None,
                message: str | None = None) -> str:
        """Commit ``folder``'s files as the new tip of ``main`` of ``repo_id`` (files it lacks are deleted),
        optionally tag that commit; returns the commit sha. olah reads git on every request."""
        dest = self.repo_dir(repo_id)
        if not (dest / ".git").is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            _git(dest, "init", "-q", "--initial-branch=main")
        for child in dest.iterdir():
            if child.name == ".git":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        shutil.copytree(folder, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
        _git(dest, "add", "-A")
        _git(dest, "commit", "-q", "-m", message or f"publish {Path(folder).name}")
        if tag:
            _git(dest, "tag", tag)
        return _git(dest, "rev-parse", "HEAD")

    # --------------------------------------------------------------------------------- server
    def _health_url(self) -> str:
        return f"{self.endpoint}/api/models/{HEALTH_REPO}/revision/main"

    def _healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self._health_url(), timeout=2) as resp:
                return resp.status == 200 and json.loads(resp.read())["id"] == HEALTH_REPO
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            return False

    def start(self, attempts: int = 3) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "README.md").write_text("health check repo\n")
            self.publish(HEALTH_REPO, tmp)
        for _ in range(attempts):  # a port taken between free_port() and the bind: try another one
            self.port = free_port()
            cfg = self.root / "olah.toml"
            cfg.write_text(
                "[basic]\n"
                f'host = "127.0.0.1"\nport = {self.port}\n'
                f"repos-path = {json.dumps(str(self.root / 'repos'))}\n"
                f"mirrors-path = [{json.dumps(str(self.mirrors))}]\n"
                "metadata-cache-ttl = 0\n"
                "[accessibility]\noffline = true\n"
            )
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "NO_PROXY": "127.0.0.1,localhost"}
            with open(self.log, "a") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "olah.server", "-c", str(cfg), "--log-path", str(self.root / "logs")],
                    cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                )
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._healthy():
                    return
                time.sleep(0.1)
            if self.proc.poll() is None:
                self.stop()
                pytest.fail(f"olah did not answer {self._health_url()} within {READY_TIMEOUT_S:g} s; "
                            f"log tail:\n{_tail(self.log)}")
        pytest.fail(f"olah exited {self.proc.returncode} {attempts} times; log tail:\n{_tail(self.log)}")

    def stop(self) -> None:
        """Kill clients nobody waited for (a test failed first), then the server."""
        for run in self.clients:
            run.kill()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # -------------------------------------------------------------------------------- clients
    def client(self, script: str, cache_dir: str | os.PathLike, *, offline: bool = False,
               endpoint: str | None = None, timeout: float = CLIENT_TIMEOUT_S) -> ClientRun:
        """Start ``script`` (after ``CLIENT_PRELUDE``) in a fresh Python with ``HF_ENDPOINT`` set to this
        server (or ``endpoint``), ``HF_HUB_CACHE=cache_dir`` and its own ``HF_HOME``; returns at once."""
        out = self.root / "clients" / f"{len(self.clients) + 1:02d}"
        env = client_env(endpoint or self.endpoint, Path(cache_dir), out / "hf_home", offline=offline)
        self.clients.append(ClientRun(script, env, out, timeout))
        return self.clients[-1]


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory) -> Iterator[HubServer]:
    """One olah server for the session (~3 s to start); skipped only if olah is not installed."""
    if importlib.util.find_spec("olah") is None:
        pytest.skip("olah is not installed (pip install olah, or pip install -e .[dev]): no local Hub server")
    server = HubServer(tmp_path_factory.mktemp("hub_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
