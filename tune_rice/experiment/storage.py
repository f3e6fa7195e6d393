"""Where an experiment lives: its folders, its saved arguments, and file I/O on a storage URI.

Ray writes trials under ``--storage-path`` (a local folder or a URI such as ``s3://`` or ``file://``);
the driver writes its own outputs (results.csv, best/, test_metrics.json, ...) into a local folder and
copies them next to Ray's state when the storage path is a URI, so that ``--resume`` finds everything
from any machine. Nothing here imports Ray (pyarrow's file systems are what Ray uses underneath).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .. import UserError
from ..records import (
    ARGS_FILE,
    BASELINE_FILE,
    BEST_DIR,
    FINAL_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    TEST_MARK,
    TEST_METRICS_FILE,
    TIMINGS_FILE,
)
from .study import STUDY_FILE

log = logging.getLogger(__name__)

# TEST_MARK is written (and on a URI storage path, uploaded) before the first test image is read: a search
# that has it and no test_metrics.json began scoring the test split, and --resume must not score it again.
# The resolved identity of each backbone's weights, kept in ARGS_FILE under this key (see save_args).
WEIGHTS_KEY = "resolved_weights"
# The search space as searched (``SearchSpace.record()``), kept in ARGS_FILE: --extend refuses another.
SPACE_KEY = "searched_space"
# What the driver copies to a URI storage path (files and folders of the local experiment folder).
OUTPUTS = (
    RESULTS_FILE,
    FINAL_FILE,
    TEST_MARK,
    TEST_METRICS_FILE,
    SUMMARY_FILE,
    TIMINGS_FILE,
    BASELINE_FILE,
    ARGS_FILE,
    BEST_DIR,
    "test",
    "valid",  # the report's gallery run (report_gallery.VALID_RUN), beside test and the trials
    "report",
    "probe",
    STUDY_FILE,
)


def is_uri(path: str) -> bool:
    return "://" in str(path)


@dataclass(frozen=True)
class ExperimentPaths:
    """``storage``: what Ray gets as its storage path; ``local``: the driver's output folder;
    ``ray_path``: the experiment under the storage path (where Ray keeps its state)."""

    name: str
    storage: str
    local: Path
    ray_path: str

    @property
    def remote(self) -> bool:
        return is_uri(self.storage)

    def read(self, name: str) -> bytes | None:
        """The file ``name`` of the experiment: from the local folder, else from the storage URI."""
        local = self.local / name
        if local.is_file():
            return local.read_bytes()
        return remote_read(self.ray_path, name) if self.remote else None

    def where(self) -> str | Path:
        """Where a person finds the outputs."""
        return self.ray_path if self.remote else self.local


def experiment_paths(storage_path: str, name: str) -> ExperimentPaths:
    if is_uri(storage_path):
        storage, local = storage_path, Path("runs").resolve() / name
    else:
        root = Path(storage_path).expanduser().resolve()  # trials change directory: absolute paths
        storage, local = str(root), root / name
    return ExperimentPaths(name=name, storage=storage, local=local, ray_path=f"{storage.rstrip('/')}/{name}")


# ------------------------------------------------------------------------------------------ arguments
def save_args(exp_dir: Path, settings: dict, *, weights: dict[str, str] | None = None) -> None:
    """``settings`` (``SearchConfig.saved()``) as search_args.json, with ``weights`` (backbone -> the
    identity its weights resolved to)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    keep = dict(settings)
    if weights is not None:
        keep[WEIGHTS_KEY] = dict(sorted(weights.items()))
    write_durably(exp_dir / ARGS_FILE, json.dumps(keep, indent=1))


def load_args(exp_dir: Path) -> dict:
    """search_args.json as saved (``SearchConfig.restore`` takes it back)."""
    return json.loads((exp_dir / ARGS_FILE).read_text())


def recorded_weights(exp_dir: Path) -> dict[str, str] | None:
    """Backbone -> weights identity as resolved when the search started (None: not recorded)."""
    return load_args(exp_dir).get(WEIGHTS_KEY)


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that it is whole and on disk when this returns (or not there at all)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def fetch_args(exp_dir: Path, uri: str) -> None:
    """``--resume`` with a URI storage path from another machine or job (``ray job submit`` runs each job
    in a fresh working directory): bring ``search_args.json`` back from the storage path."""
    data = remote_read(uri, ARGS_FILE)
    if data is not None:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / ARGS_FILE).write_bytes(data)


# ---------------------------------------------------------------------------------------- URI I/O
def upload(local: Path, uri: str, names=OUTPUTS) -> None:
    import pyarrow.fs

    fs, path = storage_fs(uri)
    fs.create_dir(path, recursive=True)  # object stores need no folders; file systems (file://) do
    for name in names:
        src = local / name
        if src.exists():
            if src.is_dir():
                fs.create_dir(f"{path}/{name}", recursive=True)
            pyarrow.fs.copy_files(
                str(src), f"{path}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs
            )
    log.info("outputs copied to %s", uri)


def storage_fs(uri: str):
    """(pyarrow file system, path) for a URI storage path; a URI it cannot open is a UserError."""
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError, ValueError) as e:
        raise UserError(f"--storage-path: cannot open {uri} ({e})") from None


def remote_read(uri: str, name: str) -> bytes | None:
    """The file ``name`` under the experiment ``uri``, or None when it is not there. Any other failure
    (credentials, permissions, network) is a UserError: "not there" would mislead."""
    import pyarrow.fs

    fs, path = storage_fs(uri)
    try:
        if fs.get_file_info(f"{path}/{name}").type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(f"{path}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"--storage-path: cannot read {uri}/{name} ({e})") from None


def remote_exists(uri: str) -> bool:
    """Whether the experiment ``uri`` holds anything (an object store has no empty folders)."""
    import pyarrow.fs

    fs, path = storage_fs(uri)
    try:
        info = fs.get_file_info(path)
        if info.type != pyarrow.fs.FileType.Directory:
            return info.type != pyarrow.fs.FileType.NotFound
        return bool(fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)))
    except OSError as e:
        raise UserError(f"--storage-path: cannot list {uri} ({e})") from None
