"""Reliability end to end: a folder salted with bad files, the test split read once, a resume that runs
nothing twice, a killed extraction, and two identical searches.

The searches share one local Ray per module with the worker start-up hook of ``test_search.py`` (it
records every image a Ray worker decodes); the driver's own reads are recorded here too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import search_argv
from PIL import Image
from search_driver import kill_mid_search, snapshot, terminated, trial_states
from test_search import _optuna_trials, _scalars, _space, ray_local  # noqa: F401

import tune_rice.data.images as data
from tune_rice.features import bank as features
from tune_rice.features.bank import FeatureSpec, extract_bank, load_bank
from tune_rice.features.model import load_artifact
from tune_rice.heads import audit
from tune_rice.search import results
from tune_rice.search import run as search
from tune_rice.tools import report

CLASSES = ("alpha", "beta", "gamma")


# ------------------------------------------------------------------------------------------ helpers
def _texture(rng: np.random.Generator, size: int = 24) -> Image.Image:
    """Smooth random structure plus noise: every image gets its own difference hash (no near-copies)."""
    low = rng.integers(30, 220, (6, 6, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    return Image.fromarray((big + rng.integers(-12, 13, big.shape)).clip(0, 255).astype(np.uint8))


def make_plain_folder(root: Path, *, per_class: int = 10, seed: int = 0) -> None:
    """``root/<class>/img_NN.jpg``: 3 classes of tiny textured JPEGs, no labels.csv."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            _texture(rng).save(root / c / f"img_{k:02d}.jpg", quality=92)


# path -> why prepare must skip it
BAD = {
    "alpha/zero.jpg": "empty file",
    "alpha/truncated.jpg": "cannot decode",
    "beta/notes.jpg": "not an image (unknown format)",
}
# awkward files that must be used
ODD = (
    "alpha/cmyk.jpg",
    "beta/cmyk.tif",
    "gamma/sixteen.png",
    "alpha/palette.png",
    "beta/rgba.png",
    "gamma/huge.png",
    "gamma/one_pixel.png",
    "beta/feuille brûlée 1.jpg",
    "gamma/linked.jpg",
)


def make_salted_folder(root: Path, outside: Path) -> None:
    """3 classes x 10 good images, the ``BAD`` files, the ``ODD`` ones and an empty class ``delta``."""
    make_plain_folder(root)
    rng = np.random.default_rng(1)
    (root / "delta").mkdir()
    good = (root / "alpha" / "img_00.jpg").read_bytes()
    (root / "alpha" / "zero.jpg").write_bytes(b"")
    (root / "alpha" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "beta" / "notes.jpg").write_text("not a photo\n")
    _texture(rng).convert("CMYK").save(root / "alpha" / "cmyk.jpg")  # PNG cannot hold CMYK
    _texture(rng).convert("CMYK").save(root / "beta" / "cmyk.tif")
    grey16 = np.asarray(_texture(rng).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(root / "gamma" / "sixteen.png")
    assert Image.open(root / "gamma" / "sixteen.png").mode.startswith("I")
    _texture(rng).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(root / "alpha" / "palette.png")
    rgba = _texture(rng).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)))
    rgba.save(root / "beta" / "rgba.png")
    # 8000 x 8000 (64 Mpx) in ~300 kB: identical rows compress to nothing. A ramp, not a flat colour, so
    # its difference hash differs from the 1x1 image's (flat images all hash to 0 and would be grouped).
    ramp = np.tile(np.linspace(0, 255, 8000).astype(np.uint8), (8000, 1))
    Image.fromarray(ramp, mode="L").save(root / "gamma" / "huge.png", compress_level=1)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "gamma" / "one_pixel.png")
    _texture(rng).save(root / "beta" / "feuille brûlée 1.jpg")
    outside.mkdir(parents=True, exist_ok=True)
    _texture(rng).save(outside / "elsewhere.jpg")
    (root / "gamma" / "linked.jpg").symlink_to((outside / "elsewhere.jpg").resolve())


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _driver_trace(trace: Path):
    """A ``data.load_image`` that appends ``pid path`` to ``trace`` (DataLoader workers fork it too)."""
    real = data.load_image

    def traced(path, **kwargs):
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {path}\n")
        return real(path, **kwargs)

    return traced


def _mark(trace: Path, text: str) -> None:
    with open(trace, "a", encoding="utf-8") as f:
        f.write(f"# {text}\n")


def _phases(trace: Path) -> dict[str, list[tuple[int, Path]]]:
    """The reads of ``trace`` grouped by the last marker before them ("start" before any)."""
    phases: dict[str, list[tuple[int, Path]]] = {"start": []}
    current = "start"
    for line in trace.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            current = line[2:]
            phases.setdefault(current, [])
        else:
            pid, path = line.split(" ", 1)
            phases[current].append((int(pid), Path(path)))
    return phases


# ------------------------------------------------------------------------------------- salted search
@pytest.fixture(scope="module")
def salted_search(ray_local, tmp_path_factory):  # noqa: F811 -- the fixture imported from test_search
    """One search on an unprepared salted folder, every image read of driver and workers traced."""
    work = tmp_path_factory.mktemp("salted")
    root = work / "data"
    make_salted_folder(root, work / "outside")
    trace = ray_local["trace"]
    trace.unlink(missing_ok=True)
    produced, records = {}, _Records()
    run_search, resolve_data, score_on_test = search.run_search, search.resolve_data, results.score_on_test
    save_winner = search.save_winner
    exp = work / "runs" / "salted"
    saved_before_test = []

    def keep(args):
        produced.update(run_search(args))
        return produced

    def resolve_and_mark(*args, **kwargs):
        out = resolve_data(*args, **kwargs)
        _mark(trace, "prepared")
        return out

    def choose_and_mark(*args, **kwargs):
        _mark(trace, "choosing")
        out = save_winner(*args, **kwargs)
        _mark(trace, "chosen")
        return out

    def score_and_mark(*args, **kwargs):
        saved_before_test.append({name: (exp / name).is_file() for name in ("best/model.pt", "final.json")})
        _mark(trace, "scoring")
        out = score_on_test(*args, **kwargs)
        _mark(trace, "scored")
        return out

    logger = logging.getLogger("tune_rice")
    logger.addHandler(records)
    stdout = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(stdout):
            m.setattr(search, "run_search", keep)
            m.setattr(search, "resolve_data", resolve_and_mark)
            m.setattr(results, "score_on_test", score_and_mark)
            m.setattr(search, "save_winner", choose_and_mark)
            m.setattr(data, "load_image", _driver_trace(trace))
            rc = search.main(
                search_argv(
                    root,
                    _space(work, epochs=2, views=1),
                    work / "runs",
                    "salted",
                    "--num-samples",
                    2,
                    "--max-epochs",
                    2,
                    "--grace-period",
                    2,
                )
            )
    finally:
        logger.removeHandler(records)
    return {
        "rc": rc,
        "root": root,
        "exp": exp,
        "produced": produced,
        "trace": trace,
        "log": records.lines,
        "out": stdout.getvalue(),
        "driver": os.getpid(),
        "saved_before_test": saved_before_test,
    }


@pytest.mark.slow
def test_salted_folder_prepares_searches_and_reports_what_it_skipped(salted_search):
    assert salted_search["rc"] == 0, salted_search["out"][-3000:]
    root, exp = salted_search["root"], salted_search["exp"]
    table = data.read_labels(root / "labels.csv")

    # exactly the good images and the awkward-but-valid ones; no bad file, the empty class is gone
    used = set(table.frame["path"])
    expected = {f"{c}/img_{k:02d}.jpg" for c in CLASSES for k in range(10)} | set(ODD)
    assert used == expected and len(table.frame) == 39
    assert table.classes == CLASSES
    for rel in ODD:
        image = data.load_image(root / rel)
        assert image.mode == "RGB", rel
    assert table.frame.set_index("path").loc["gamma/huge.png", ["width", "height"]].tolist() == [8000, 8000]

    # every skipped file named with its reason, in the search's own output (it prepared the folder)
    log = "\n".join(salted_search["log"])
    for rel, reason in BAD.items():
        assert f"{rel}: {reason}" in log, (rel, log[-2000:])
    assert "delta" in log and "no usable images" in log

    # the banks hold exactly the train and valid rows; the test score exactly the test rows
    banks = salted_search["produced"]["banks"]
    assert len(banks) == 1
    bank = next(iter(banks.values()))
    for split in ("train", "valid"):
        rows = table.split(split)
        assert len(bank.splits[split]) == len(rows) and bank.splits[split].paths == list(rows["path"])
        assert bank.splits[split].features.shape[:2] == (len(rows), 1)
        assert np.isfinite(bank.splits[split].features.astype(np.float32)).all()
    assert sum(len(s) for s in bank.splits.values()) + len(table.split("test")) == 39
    test = json.loads((exp / "test_metrics.json").read_text())
    assert test["test_count"] == len(table.split("test")) == int(np.asarray(test["confusion_matrix"]).sum())
    df = pd.read_csv(exp / "results.csv").query("kind == 'trial'")
    assert len(df) == 2 and set(df["status"]) == {"TERMINATED"}
    model, meta = load_artifact(exp / "best" / "model.pt")
    assert meta["classes"] == list(CLASSES)
    assert "TEST (scored once" in salted_search["out"]


@pytest.mark.slow
def test_the_test_split_is_read_once_by_the_final_scoring_only(salted_search):
    assert salted_search["rc"] == 0
    table = data.read_labels(salted_search["root"] / "labels.csv")
    test_paths = set(table.paths("test"))
    phases = _phases(salted_search["trace"])
    assert set(phases) == {"start", "prepared", "choosing", "chosen", "scoring", "scored"}, set(phases)

    # prepare decodes every candidate file once (it does not know the split yet)
    candidates = {salted_search["root"] / rel for rel in [*table.frame["path"], *BAD]}
    assert Counter(p for _, p in phases["start"]) == Counter(candidates)
    # then extraction (driver) and trials (Ray workers): every train and valid image exactly once, no test
    # image; the trials themselves decode nothing (the feature cache is on)
    between = Counter(p for _, p in phases["prepared"])
    once = Counter(table.paths("train") + table.paths("valid"))
    # ... and the data audit decodes some train images again, to plant copies of them for its threshold
    again = between - once
    assert between - again == once and set(again) <= set(table.paths("train"))
    assert 0 < sum(again.values()) <= audit.CALIBRATION_SOURCES
    assert not set(between) & test_paths
    # the final model is chosen and calibrated on the banks' valid logits: no image decoded; it is saved
    # (best/model.pt and final.json) before the test split is read, and the test pass is the only one
    assert phases["choosing"] == [] and phases["chosen"] == []
    assert salted_search["saved_before_test"] == [{"best/model.pt": True, "final.json": True}]
    # the final scoring: each test image exactly once, by the driver or its DataLoader workers
    scoring = phases["scoring"]
    assert Counter(p for _, p in scoring) == Counter(test_paths)
    driver = salted_search["driver"]
    for pid, _ in scoring:
        assert pid == driver or _parent(pid) in (driver, None), pid  # None: a finished loader worker
    assert phases["scored"] == []  # nothing reads images after the scoring


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


# ------------------------------------------------------------------------------------------- resume
def _epochs(trial_dir: Path) -> list[int]:
    progress = trial_dir / "progress.csv"
    if not progress.is_file() or progress.stat().st_size == 0:
        return []
    try:
        return pd.read_csv(progress)["training_iteration"].astype(int).tolist()
    except (pd.errors.EmptyDataError, KeyError):
        return []


METRIC_COLUMNS = ["epoch", "lr", "train/loss", "train/acc", "valid/loss", "valid/acc", "valid/macro_f1"]


@pytest.mark.slow
def test_resume_after_a_kill_mid_trial_loses_nothing_and_repeats_exactly(ray_local, tmp_path):  # noqa: F811
    """test_search's resume test kills between trials; here a trial is half done when the driver dies.

    Tune restarts a trial from the checkpoint its last experiment snapshot names, so the epochs a trial
    ran after that snapshot run again: they must repeat exactly (same numbers), and nothing else may.
    """
    labels = tmp_path / "data"
    make_plain_folder(labels, per_class=8)
    # An epoch of a head on this bank takes a few ms, so a whole search can end between two polls: the
    # second trial is held after epoch 5 of 10 until the kill (a worker setup hook, tests/search_driver.py),
    # which changes no number the test compares. Three trials: one finished, one half done and one not
    # started at the kill.
    epochs, samples, held_at = 10, 3, 5
    storage = tmp_path / "runs"
    exp = storage / "r"
    argv = search_argv(
        labels,
        _space(tmp_path, epochs=epochs, views=1),
        storage,
        "r",
        "--num-samples",
        samples,
        "--max-concurrent",
        1,
        "--grace-period",
        epochs,
        "--address",
        ray_local["address"],
    )
    at_kill: dict[str, int] = {}

    def half_done() -> bool:  # a trial finished and another started, not done
        states = snapshot(exp)
        finished = {t for t, state in states.items() if state["status"] == "TERMINATED"}
        running = {d.name[len("trial_") :]: _epochs(d) for d in exp.glob("trial_*")} if finished else {}
        at_kill.clear()
        at_kill.update({t: len(e) for t, e in running.items() if t not in finished and e})
        # ... and the experiment snapshot the resume reads records the held trial at that epoch. Until
        # then it may name epoch 1's checkpoint in the trial's last result before Tune has registered it
        # (the save is processed after the result), and the resume starts that trial from scratch: the
        # kill would not test a restore (it happened once under load).
        held = any(state["status"] == "RUNNING" and state["iteration"] == held_at for state in states.values())
        return bool(finished and at_kill and held)

    kill_mid_search(argv, work=tmp_path, trial=1, after_epoch=held_at, ready=half_done, what="a trial half done")
    finished = terminated(exp)
    before = {d.name: (d / "progress.csv").read_bytes() for d in exp.glob("trial_*") if (d / "progress.csv").exists()}
    assert not (exp / "results.csv").exists()

    # As a user resumes: a new process with its own new Ray session (the trials' staging folders are new
    # and empty; what they logged before is only in the storage path).
    resumed = subprocess.run(
        [sys.executable, "-m", "tune_rice.search", "--resume", "--name", "r", "--storage-path", str(storage)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    # Optuna warns when a step is reported twice: the search must not pass repeated epochs on to it
    assert "The reported value is ignored" not in out, out[-3000:]
    df = pd.read_csv(exp / "results.csv").query("kind == 'trial'")
    assert len(df) == samples and df["trial_id"].is_unique and set(df["status"]) == {"TERMINATED"}, df
    assert finished <= set(df["trial_id"]) and (df["epochs"] == epochs).all()
    for tid in finished:  # finished trials untouched
        assert (exp / f"trial_{tid}" / "progress.csv").read_bytes() == before[f"trial_{tid}"], tid
    for name, old in before.items():  # what the interrupted trials had logged is kept as it was
        assert (exp / name / "progress.csv").read_bytes().startswith(old), (
            f"{name}; the first driver said:\n{(tmp_path / 'first.log').read_text()[-2000:]}\nthe resume said:\n{out[-3000:]}"
        )
    repeated = 0
    for _, row in df.iterrows():
        # result.json, not progress.csv: Tune appends to a restored trial's progress.csv under its old
        # header with one column fewer (a Ray bug), which shifts the columns of the new rows
        history = pd.DataFrame(json.loads(line) for line in (Path(row["trial_dir"]) / "result.json").open())
        assert sorted(set(history["training_iteration"])) == list(range(1, epochs + 1)), row["trial_id"]
        assert (history["epoch"] == history["training_iteration"]).all()
        if row["trial_id"] in at_kill:  # the half-done trial went on from a checkpoint, not from scratch
            assert (history["iterations_since_restore"] < history["training_iteration"]).any(), row["trial_id"]
        # an epoch run again after the restore gives exactly what it gave before the kill
        unique = history[METRIC_COLUMNS].drop_duplicates()
        assert unique["epoch"].is_unique, history[METRIC_COLUMNS]
        repeated += len(history) - epochs
        # TensorBoard shows each epoch once: the repeats are identical and not written again
        scalars = _scalars(Path(row["trial_dir"]))
        for tag in ("valid/acc", "train/loss", "train/lr"):
            assert [step for step, _ in scalars[tag]] == list(range(1, epochs + 1)), (row["trial_id"], tag)
        first = history.drop_duplicates("epoch").set_index("epoch")["valid/acc"]
        assert np.allclose([v for _, v in scalars["valid/acc"]], first.loc[range(1, epochs + 1)], atol=1e-6)
    print(f"epochs run again after the restore: {repeated} (epochs done per trial at the kill: {at_kill})")
    assert report.main([str(exp)]) == 0  # reads those histories (it crashed on the shifted columns)
    assert len(report.load_experiment(exp).histories) == samples
    assert f"{samples} trials" in (exp / "report" / "report.md").read_text()
    states = trial_states(exp)
    assert {t: s for t, (s, _) in states.items()} == {t: "TERMINATED" for t in df["trial_id"]}
    trials = _optuna_trials(exp, "valid/acc", "max", max_t=epochs)
    assert set(trials) == set(df["trial_id"])  # one proposal per trial: none proposed or run again
    assert sorted(t.number for t in trials.values()) == list(range(samples))
    assert {t.state.name for t in trials.values()} == {"COMPLETE"}


def test_report_reads_a_resumed_trial_whose_progress_csv_columns_shifted(tmp_path):
    """What Tune leaves after a restore: progress.csv rows written under the old header with one column
    fewer (``should_checkpoint``), an epoch listed twice; result.json intact."""
    from helpers_artifacts import make_fake_experiment

    exp = make_fake_experiment(tmp_path, n_trials=4, n_errored=0)
    trial_id = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})["trial_id"].iloc[0]
    trial = exp / f"trial_{trial_id}"
    rows = pd.read_csv(trial / "progress.csv").to_dict("records")
    with open(trial / "result.json", "w") as f:
        for row in [*rows[:3], rows[2], *rows[3:]]:  # epoch 3 ran again after the restore
            f.write(json.dumps({**row, "config": {"lr": 0.1}}) + "\n")
    header = ["epoch", "train/loss", "valid/loss", "valid/acc", "should_checkpoint", "training_iteration", "trial_id"]
    lines = [",".join(header)]
    for k, row in enumerate(rows):  # from the 4th row on, no should_checkpoint: the columns shift left
        values = [row["epoch"], row["train/loss"], row["valid/loss"], row["valid/acc"]]
        values += [True] if k < 3 else []
        lines.append(",".join(map(str, [*values, row["training_iteration"], row["trial_id"]])))
    (trial / "progress.csv").write_text("\n".join(lines) + "\n")

    loaded = report.load_experiment(exp)
    hist = loaded.histories[trial_id]
    assert hist["_epoch"].tolist() == list(range(1, len(rows) + 1))
    assert hist["valid/acc"].tolist() == pytest.approx([r["valid/acc"] for r in rows])
    assert report.main([str(exp)]) == 0


# ------------------------------------------------------------------------------------------ determinism
@pytest.mark.slow
def test_same_data_seed_and_space_give_the_same_search(ray_local, tmp_path):  # noqa: F811
    raw = tmp_path / "raw"
    make_plain_folder(raw, per_class=8)
    space = _space(tmp_path, epochs=2, views=2)
    runs = []
    for k in (1, 2):
        folder = tmp_path / f"copy{k}"  # a copy each: each run prepares it and extracts its own bank
        shutil.copytree(raw, folder)
        storage = tmp_path / f"runs{k}"
        rc = search.main(
            search_argv(
                folder,
                space,
                storage,
                "d",
                "--num-samples",
                12,
                "--max-concurrent",
                1,
                "--grace-period",
                2,
                "--seed",
                3,
            )
        )
        assert rc == 0
        exp = storage / "d"
        trials = sorted(_optuna_trials(exp, "valid/acc", "max", max_t=2).values(), key=lambda t: t.number)
        df = pd.read_csv(exp / "results.csv").query("kind == 'trial'")
        best = df.iloc[0].drop(["trial_id", "trial_dir", "node_id"]).dropna().to_dict()  # gpu_ids: NaN on CPU
        test = json.loads((exp / "test_metrics.json").read_text())
        # Tune names trials with random ids: compare the records with the ids left out
        test.pop("trial_id")
        test["members"] = len(test.get("members", []))
        for record in test.values():
            if isinstance(record, dict):
                record.pop("trial_id", None)
                if "members" in record:  # an ensemble's members name trials by those ids
                    record["members"] = len(record["members"])
        for other in test.get("compared", {}).values():  # the probe or the best trial compared on test
            other.pop("trial_id")
        runs.append(
            {
                "labels": (folder / "labels.csv").read_bytes(),
                "params": [t.params for t in trials],
                "values": [t.intermediate_values for t in trials],
                "best": best,
                "test": test,
            }
        )
    first, second = runs
    assert first["labels"] == second["labels"]
    # the proposals in order of creation: 10 from TPE's seeded start-up phase, then 2 that depend on the
    # values the earlier trials reached
    assert len(first["params"]) == 12 and first["params"] == second["params"]
    assert first["values"] == second["values"]  # every epoch's valid/acc of every trial
    assert first["best"] == second["best"]
    assert first["test"] == second["test"]


# ------------------------------------------------------------------------------------ killed extraction
_EXTRACT_CHILD = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    import numpy as np
    import tune_rice.features.bank as features
    from tune_rice.features.bank import FeatureSpec, extract_bank

    labels, cache, mode = sys.argv[1:4]
    if mode == "saving":  # widen the window between the temp folder appearing and its rename
        real_save = np.save
        def slow_save(file, arr, *a, **k):
            real_save(file, arr, *a, **k)
            time.sleep(0.5)
        np.save = slow_save
    else:  # "extracting": say when the backbone starts, then take a while per batch
        real_run = features.run_backbones
        def slow_run(backbones, loader, **k):
            Path(cache, "started").touch()
            return real_run(backbones, (time.sleep(0.5) or batch for batch in loader), **k)
        features.run_backbones = slow_run
    extract_bank(labels, FeatureSpec(backbone="resnet18", image_size=32, views=3, seed=0), weights="none",
                 cache_dir=cache, device="cpu", num_workers=0, batch_size=6, progress=False)
    print("finished")
""")


@pytest.mark.slow
@pytest.mark.parametrize("when", ["extracting", "saving"])
def test_a_killed_extraction_leaves_no_bank_and_the_next_one_is_identical(separable, tmp_path, when):
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXTRACT_CHILD, str(separable), str(cache), when],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the extraction never reached the point to kill it"
            temps = [p for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()]
            if when == "extracting" and (cache / "started").exists():
                break
            if when == "saving" and temps and any(temps[0].iterdir()):  # half written
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (cache / "started").unlink(missing_ok=True)
    left = sorted(p.name for p in cache.iterdir())
    assert all(name.startswith(".") and ".tmp-" in name for name in left), left  # no bank under its key
    if when == "saving":
        assert left and not (cache / left[0] / "meta.json").exists()

    spec = FeatureSpec(backbone="resnet18", image_size=32, views=3, seed=0)
    quick = dict(weights="none", device="cpu", num_workers=0, progress=False)
    for leftover in cache.iterdir():  # as if the kill was a while ago (a fresh one may be a write going on)
        t = time.time() - features.STALE_TEMP_S - 1
        os.utime(leftover, (t, t))
    again = extract_bank(separable, spec, cache_dir=cache, **quick)
    assert not again.from_cache  # the leftover is not trusted
    assert sorted(p.name for p in cache.iterdir()) == [again.key]  # and it was swept when the bank was saved
    reference = extract_bank(separable, spec, use_cache=False, **quick)  # an uninterrupted run
    for split in ("train", "valid"):
        assert np.array_equal(again.splits[split].features, reference.splits[split].features)
        assert np.array_equal(again.splits[split].targets, reference.splits[split].targets)
    assert np.array_equal(again.mean, reference.mean) and np.array_equal(again.std, reference.std)
    assert extract_bank(separable, spec, cache_dir=cache, **quick).from_cache  # now a complete bank
    saved = load_bank(cache / again.key)
    assert np.array_equal(saved.splits["train"].features, reference.splits["train"].features)
