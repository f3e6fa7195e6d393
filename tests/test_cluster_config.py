"""The cluster launcher configs (cluster*.yaml at the repository root) pass Ray's own checks, offline.

``prepare_config`` is what ``ray up`` runs first: it merges the file with the provider's bundled
defaults (``ray/autoscaler/aws/defaults.yaml``; for provider ``local`` it builds the single node type
from head_ip/worker_ips) and fills each node type's min/max workers. ``validate_config`` checks the result
against Ray's ``ray-schema.json`` (unknown keys, types: resource amounts must be integers) and the
cross-field rules (head type exists, min_workers fit max_workers). Neither needs AWS: the next step of
``ray up`` (``bootstrap_config``: IAM role, key pair, security group, AMI lookup through boto3) does, and is
not run here. The network is blocked for the duration of each test to keep it that way.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(REPO.glob("cluster*.yaml"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config checks must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def checked(raw: dict) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_the_configs_exist():
    assert {p.name for p in CONFIGS} >= {"cluster.yaml", "cluster-local.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validator(path):
    config = checked(load(path))
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_pins_this_ray_and_installs_the_project(path):
    raw = load(path)
    # Without setup_commands, the AWS defaults would install a Ray nightly on every node.
    setup = raw.get("setup_commands") or []
    assert any(f"ray[tune,default]=={ray.__version__}" in c for c in setup), setup
    for image_key in ("image", "head_image", "worker_image"):
        image = (raw.get("docker") or {}).get(image_key)
        if image:
            assert f":{ray.__version__}-" in image and "ray-ml" not in image, image
    # the repository is copied to every node and installed there, from where it was copied
    ((remote, local),) = raw["file_mounts"].items()
    assert (REPO / local).resolve() == REPO
    assert any("pip install" in c and "-e" in c and c.rstrip().endswith(remote) for c in setup), setup


def test_aws_gpu_workers_scale_from_zero():
    config = checked(load(REPO / "cluster.yaml"))
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    for t in config["available_node_types"].values():  # every node can read and write the S3 storage path
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_local_config_lists_its_machines():
    raw = load(REPO / "cluster-local.yaml")
    assert raw["provider"]["type"] == "local" and raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    config = checked(raw)
    (worker,) = [t for name, t in config["available_node_types"].items()]
    assert worker["max_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda c: c.update(unknown_key=1), jsonschema.ValidationError),
        (
            lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU=0.5),
            jsonschema.ValidationError,
        ),
        (lambda c: c.update(head_node_type="nope"), ValueError),
        (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=9), ValueError),
    ],
    ids=["unknown key", "fractional resource", "missing head type", "min over max"],
)
def test_the_validator_rejects_broken_configs(break_it, error):
    raw = load(REPO / "cluster.yaml")
    break_it(raw)
    with pytest.raises(error):
        checked(raw)
