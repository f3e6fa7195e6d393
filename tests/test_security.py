"""Security: nothing the tools read can run code, labels.csv cannot point outside its dataset, and the local
Ray the search starts serves no dashboard.

Already proven elsewhere (not repeated here): ``predict --model`` refuses a planted pickle
(test_predict.py::test_a_pickle_that_runs_code_is_refused_and_never_run); ``safe_torch_load``,
``--weights FILE`` resolution and ``load_artifact`` refuse it (test_model.py::test_malicious_pickle_is_refused);
a tampered torch hub cache file is refused (test_model.py::test_hub_cache_is_loaded_weights_only);
``read_labels`` refuses ``..`` and absolute paths (test_data.py::test_read_labels_refuses_paths_outside_root).
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SMALL_SPACE, search_argv

import tune_rice
from tune_rice.search import run as search
from tune_rice.search import tune_glue
from tune_rice.tools import evaluate, export

PACKAGE = Path(tune_rice.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


class _Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _calls(predicate):
    """``(file:line, call node)`` for every call in the package whose dotted name satisfies ``predicate``."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if predicate(name):
                    found.append((f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}", name, node))
    return found


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


# ----------------------------------------------------------------------------------- source checks
def test_the_package_is_parsed():
    assert len(SOURCES) >= 10 and any(p.name == "run.py" for p in SOURCES)


def test_every_torch_load_is_weights_only():
    loads = _calls(lambda name: name in ("torch.load", "load") or name.endswith(".torch.load"))
    assert loads, "no torch.load found: the check looks at the wrong thing"
    unsafe = [
        (where, ast.unparse(node))
        for where, name, node in loads
        if name.endswith("torch.load") and not _is_true(_keyword(node, "weights_only"))
    ]
    assert unsafe == []
    assert not [w for w, name, _ in loads if name == "load"], "a bare load(): from torch import load?"
    # torchvision's Weights.get_state_dict goes through torch.hub, whose default is weights_only=False
    hub = _calls(lambda name: name.endswith("get_state_dict") or name.endswith("load_state_dict_from_url"))
    assert hub and all(_is_true(_keyword(node, "weights_only")) for _, _, node in hub), hub


def test_no_other_unsafe_deserialisation():
    assert (
        _calls(
            lambda n: (
                n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve")
                and n.split(".")[-1] in ("load", "loads", "open", "Unpickler")
            )
        )
        == []
    )
    assert (
        _calls(
            lambda n: (
                n
                in (
                    "yaml.load",
                    "yaml.unsafe_load",
                    "yaml.full_load",
                    "yaml.load_all",
                    "yaml.unsafe_load_all",
                    "yaml.full_load_all",
                )
            )
        )
        == []
    )
    yaml_loads = [n for _, n, _ in _calls(lambda n: n.startswith("yaml.") and "load" in n)]
    assert yaml_loads and set(yaml_loads) == {"yaml.safe_load"}
    assert [
        w for w, _, node in _calls(lambda n: n in ("np.load", "numpy.load")) if _is_true(_keyword(node, "allow_pickle"))
    ] == []
    assert _calls(lambda n: n in ("eval", "exec")) == []
    # TorchScript archives carry their own code: loaded in one documented place only (model.py's
    # read_torchscript, for --model with an export; its docstring tells to load only exports you trust)
    jit = _calls(lambda n: n == "torch.jit.load")
    assert [w.split(":")[0] for w, _, _ in jit] == ["features/model.py"]
    # Tune's experiment state is unpickled by Tuner.restore: only on --resume of the user's own --name
    restores = _calls(lambda n: n.endswith("Tuner.restore"))
    assert [w.split(":")[0] for w, _, _ in restores] == ["search/run.py"]


# ---------------------------------------------------------------------------------- planted pickles
@pytest.fixture
def evil_model(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"format": "tune-rice-model", "payload": _Evil(marker)}, path)
    return path, marker


def _one_line_refusal(err: str, path: Path) -> None:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert str(path) in err and "refused to load" in err and "could run code" in err, err


def test_evaluate_refuses_a_planted_pickle(evil_model, separable, tmp_path, capsys):
    path, marker = evil_model
    rc = evaluate.main(["--model", str(path), "--data", str(separable), "--out", str(tmp_path / "m.json")])
    assert rc == 2
    _one_line_refusal(capsys.readouterr().err, path)
    assert not marker.exists() and not (tmp_path / "m.json").exists()


def test_export_refuses_a_planted_pickle(evil_model, tmp_path, capsys):
    path, marker = evil_model
    rc = export.main(["--model", str(path), "--out", str(tmp_path / "m.ts")])
    assert rc == 2
    _one_line_refusal(capsys.readouterr().err, path)
    assert not marker.exists() and not (tmp_path / "m.ts").exists()


def _no_ray(monkeypatch):
    """The search up to its first use of Ray, without starting one (the checks below come first)."""
    monkeypatch.setattr(tune_glue, "init_ray", lambda address: None)
    monkeypatch.setattr(tune_glue, "wait_for_gpus", lambda seconds: None)
    monkeypatch.setattr(tune_glue, "resolve_gpus", lambda value: 0.0)


def test_search_weights_file_refuses_a_planted_pickle(evil_model, separable, tmp_path, capsys, monkeypatch):
    path, marker = evil_model
    _no_ray(monkeypatch)
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    rc = search.main(search_argv(separable, tmp_path / "space.yaml", tmp_path / "runs", "x", weights=str(path)))
    assert rc == 2
    _one_line_refusal(capsys.readouterr().err, path)
    assert not marker.exists() and not (tmp_path / "runs" / "x").exists()


# ------------------------------------------------------------------------------------ labels.csv paths
@pytest.mark.parametrize("bad", ["../outside.png", "alpha/../../outside.png", "/etc/passwd", "\\\\server\\x.png"])
def test_search_refuses_labels_that_escape_the_dataset_root(bad, separable, tmp_path, capsys, monkeypatch):
    (tmp_path / "outside.png").write_bytes((separable.parent / "alpha" / "alpha_000.png").read_bytes())
    frame = pd.read_csv(separable)
    frame.loc[0, "path"] = bad
    frame.to_csv(separable, index=False)
    _no_ray(monkeypatch)
    monkeypatch.setattr(search, "start_ray", lambda *a, **k: pytest.fail("got past the labels check"))
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    rc = search.main(search_argv(separable, tmp_path / "space.yaml", tmp_path / "runs", "x"))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and repr(bad) in err and "dataset root" in err, err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ local Ray
def test_local_ray_is_started_without_a_dashboard(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append((a, k)))
    tune_glue.init_ray(None)
    ((args, kwargs),) = calls
    assert not args and "address" not in kwargs
    assert kwargs["include_dashboard"] is False and kwargs["dashboard_host"] == "127.0.0.1"


_LISTENERS_CHILD = textwrap.dedent("""\
    import json, os, sys
    from pathlib import Path
    from tune_rice.search import tune_glue
    tune_glue.init_ray(None)
    import ray
    ray.get(ray.remote(lambda: 1).remote())  # a worker process up, as in a search

    def tree(root):
        kids = {}
        for e in os.listdir("/proc"):
            if e.isdigit():
                try:
                    ppid = int(Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                kids.setdefault(ppid, []).append(int(e))
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(kids.get(p, []))
        return out

    inodes = {}
    for pid in tree(os.getpid()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\\0")[0].decode()
                    inodes[link[8:-1]] = (pid, os.path.basename(name))
        except OSError:
            continue
    listeners = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr, port = f[1].split(":")
                listeners.append([addr, int(port, 16), *inodes[f[9]]])
    try:
        from ray._private.authentication import authentication_token_setup as auth
        by_default = hasattr(auth, "enable_token_auth_by_default")
    except ImportError:  # a Ray without token authentication
        by_default = False
    print("LISTENERS " + json.dumps({"listeners": listeners, "auth": os.environ.get("RAY_AUTH_MODE"),
                                     "token_auth_by_default": by_default}))
    ray.shutdown()
""")


def _address(hex_addr: str) -> ipaddress._BaseAddress:
    """/proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    return getattr(address, "ipv4_mapped", None) or address


@pytest.mark.slow
def test_local_ray_serves_no_dashboard_and_requires_a_token(tmp_path):
    """What the local Ray of a search listens on (Ray 2.60): no dashboard, no Ray Client server; GCS,
    raylet and core workers listen on all interfaces (Ray binds them so; nothing in ray.init narrows
    them, and ``_node_ip_address="127.0.0.1"`` is rewritten to the node's IP), behind Ray's token
    authentication, which a new local cluster turns on when RAY_AUTH_MODE is unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-c", _LISTENERS_CHILD], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LISTENERS ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = json.loads(line[len("LISTENERS ") :])
    listeners = [(_address(a), port, pid, name) for a, port, pid, name in found["listeners"]]
    print("\n".join(f"{str(a):>16}:{port:<6} {name} (pid {pid})" for a, port, pid, name in listeners))
    assert listeners
    assert not [entry for entry in listeners if entry[1] in (8265, 10001)]  # dashboard, Ray Client
    assert not [entry for entry in listeners if "dashboard" in entry[3].lower()]
    wildcard = {name for a, _, _, name in listeners if a.is_unspecified}
    # Ray's own servers: GCS, raylet, the driver's and the workers' core-worker gRPC servers
    assert all(n in ("gcs_server", "raylet") or n.startswith(("ray::", "python")) for n in wildcard), wildcard
    if found["token_auth_by_default"]:
        assert found["auth"] == "token"
