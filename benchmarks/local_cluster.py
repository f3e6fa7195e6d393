"""A real multi-node Ray cluster on one machine: one ``ray start`` per node, each in its own temp dir.

Used by ``tests/test_multinode.py`` and ``benchmarks/node_failure.py``. Every node is a separate raylet
(separate object store, separate worker processes), started exactly as on a real cluster, so trials
scheduled on "the worker" really run in another node's processes and die with it.

Safe on a shared machine:

- every fixed-default port is picked free (GCS, Ray client server, dashboard, dashboard agent), so
  nothing collides with the defaults (6379, 10001, 8265, 52365) another person's Ray may be using;
- each node gets its own ``--temp-dir`` under a private folder, so ``ray start`` writes its
  ``ray_current_cluster`` file there and a plain ``ray.init()`` elsewhere on the machine never joins
  this cluster by accident;
- shutdown does NOT run ``ray stop`` (that kills every Ray process on the machine, other people's too):
  it signals only the processes whose command line names this cluster's private folder, and their
  descendants (the ``ray::`` worker processes).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY_BIN = str(Path(sys.executable).with_name("ray"))
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                out[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def pids_matching(needle: str) -> list[int]:
    """Processes whose command line contains ``needle``, and all their descendants (Ray renames its
    worker processes ``ray::...``, so those are found as children of their raylet). Linux only."""
    me = os.getpid()
    found = {int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me and needle in _cmdline(int(e))}
    parents = _parents()
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found and pid not in found and pid != me}
        grew = bool(children)
        found |= children
    return sorted(found)


class LocalCluster:
    """``with LocalCluster() as c: c.add_node(head=True, ...); c.add_nodes(2, ...)`` -> ``c.address``."""

    def __init__(self, *, object_store_mb: int = 100, env: dict | None = None):
        # Short root: Ray's unix socket paths live under it and must stay < 108 characters.
        self.root = Path(tempfile.mkdtemp(prefix="trc", dir="/tmp"))
        self.object_store_bytes = object_store_mb * 1024 * 1024
        # Token authentication with a token of this cluster's own: Ray 2.60's `ray start --head` turns token
        # auth on by itself when ~/.ray/auth_token exists, but `ray start --address` does not, so leaving the
        # mode unset makes workers fail to join. Pass ``client_env`` to every driver of this cluster.
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.client_env, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.address: str | None = None
        self.nodes: list[dict] = []

    # ---------------------------------------------------------------------------------------- nodes
    def add_node(self, *, head: bool = False, num_cpus: int = 1, num_gpus: int = 0, timeout: float = 60) -> dict:
        return self._start(self._command(head=head, num_cpus=num_cpus, num_gpus=num_gpus), timeout)

    def add_nodes(self, count: int, *, num_cpus: int = 1, num_gpus: int = 0, timeout: float = 60) -> list[dict]:
        """``count`` worker nodes, their ``ray start`` run side by side (each takes seconds, mostly its
        own start-up)."""
        from concurrent.futures import ThreadPoolExecutor

        commands = []
        for _ in range(count):
            commands.append(self._command(head=False, num_cpus=num_cpus, num_gpus=num_gpus))
            self.nodes.append({"name": commands[-1][0]})  # reserves the name until the node is up
        with ThreadPoolExecutor(count) as pool:
            started = list(pool.map(lambda c: self._start(c, timeout, placeholder=True), commands))
        return started

    def _command(self, *, head: bool, num_cpus: int, num_gpus: int) -> tuple[str, bool, int, int, list[str]]:
        name = "head" if head else f"w{len(self.nodes)}"
        temp_dir = self.root / name
        cmd = [
            RAY_BIN,
            "start",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            f"--node-ip-address={LOCALHOST}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        if head:
            port = free_port()
            cmd += [
                "--head",
                f"--port={port}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
            ]
            self._head_port = port
        else:
            if self.address is None:
                raise RuntimeError("start the head node first")
            cmd += [f"--address={self.address}"]
        return name, head, num_cpus, num_gpus, cmd

    def _start(self, command: tuple, timeout: float, placeholder: bool = False) -> dict:
        name, head, num_cpus, num_gpus, cmd = command
        temp_dir = self.root / name
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        if head:
            self.address = f"{LOCALHOST}:{self._head_port}"
        raylet = self._raylet_pid(temp_dir)
        node = {
            "name": name,
            "temp_dir": temp_dir,
            "raylet_pid": raylet,
            "node_id": self._node_id(raylet),
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "start_s": time.perf_counter() - t,
        }
        if placeholder:  # add_nodes put a placeholder under this name
            self.nodes[next(i for i, n in enumerate(self.nodes) if n["name"] == name)] = node
        else:
            self.nodes.append(node)
        return node

    @staticmethod
    def _raylet_pid(temp_dir: Path, timeout: float = 20) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for pid in pids_matching(str(temp_dir)):
                argv = _cmdline(pid).split(" ")
                if argv and argv[0].endswith("/raylet"):
                    return pid
            time.sleep(0.2)
        raise RuntimeError(f"no raylet found for {temp_dir}")

    @staticmethod
    def _node_id(raylet_pid: int) -> str:
        for arg in _cmdline(raylet_pid).split(" "):
            if arg.startswith("--node_id="):
                return arg.split("=", 1)[1]
        raise RuntimeError(f"raylet {raylet_pid} has no --node_id")

    def node(self, name: str) -> dict:
        return next(n for n in self.nodes if n["name"] == name)

    def kill_node(self, name: str, *, whole: bool = False) -> float:
        """SIGKILL the node's raylet (``whole``: every process of the node at once, as when the machine
        dies; a raylet alone leaves its worker processes running for a second or two). Returns the
        ``time.time()`` of the kill."""
        node = self.node(name)
        pids = pids_matching(str(node["temp_dir"])) if whole else [node["raylet_pid"]]
        t = time.time()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return t

    # ------------------------------------------------------------------------------------- shutdown
    def shutdown(self, timeout: float = 3) -> None:
        """Stop this cluster's processes only (SIGTERM, then SIGKILL after ``timeout`` seconds: a raylet
        or GCS takes 10-15 s to exit on SIGTERM, and nothing of a throwaway cluster needs saving), then
        remove its folder."""
        needle = str(self.root)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = pids_matching(needle)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + (timeout if sig == signal.SIGTERM else 5)
            while pids and time.time() < deadline:
                pids = [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]
                time.sleep(0.2)
            if not pids:
                break
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
