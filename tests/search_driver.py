"""``python tests/search_driver.py SPEC_JSON SEARCH_ARGS...``: the search, with its trials held by the test.

For the tests that kill a search mid-way or need trials to overlap: a Ray worker setup hook (given to the
driver's ``ray.init``, so it reaches every worker of the job, on every node) wraps ``ray.tune.report`` in
the trial's process. The product has no such hook; the tests reach in from here.

SPEC (all keys optional besides ``dir``, a folder the test watches):
- ``hold``: ``{"trial": K, "after_epoch": E}``: the K-th trial to start (0-based) writes ``dir/held-K``
  after reporting epoch E, then waits until ``dir/release`` exists.
- ``together``: N: each of the first N trials waits after its first report until N trials have started,
  so that N trials are running at the same moment.
Each trial claims its ordinal by creating ``dir/started-<n>`` (the first free n).

The tests import :func:`kill_mid_search` from here: it runs this driver and kills it while a trial is held.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def make_hook(spec: dict):
    def hook():
        import os
        import time
        from pathlib import Path

        import ray.tune

        folder = Path(spec["dir"])
        report = ray.tune.report
        ordinals: dict[str, int] = {}

        def claim() -> int:
            n = 0
            while True:
                try:
                    os.close(os.open(folder / f"started-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    return n
                except FileExistsError:
                    n += 1

        def wait_for(done) -> None:
            while not done():
                time.sleep(0.05)

        def held_report(metrics, *args, **kwargs):
            trial = ray.tune.get_context().get_trial_id()
            if trial not in ordinals:
                ordinals[trial] = claim()
            out = report(metrics, *args, **kwargs)
            k, epoch = ordinals[trial], int(metrics.get("epoch", 0))
            hold = spec.get("hold")
            if hold and k == hold["trial"] and epoch == hold["after_epoch"]:
                (folder / f"held-{k}").touch()
                wait_for(lambda: (folder / "release").exists())
            together = spec.get("together", 0)
            if k < together and epoch == 1:
                wait_for(lambda: len(list(folder.glob("started-*"))) >= together)
            return out

        ray.tune.report = held_report

    return hook


def snapshot(exp_dir: Path) -> dict[str, dict]:
    """Trial id -> what Tune's saved experiment state says of it: ``status``, ``failures`` and
    ``iteration``, the last reported training iteration that state records (0: none)."""
    trials = {}
    for f in sorted(exp_dir.glob("experiment_state-*.json")):
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError):  # being rewritten
            continue
        for trial_json, run_json in state.get("trial_data", []):
            trial, run = json.loads(trial_json), json.loads(run_json)
            trials[trial["trial_id"]] = {
                "status": trial.get("status"),
                "failures": int(run.get("num_failures", 0)),
                "iteration": int((run.get("last_result") or {}).get("training_iteration", 0)),
            }
    return trials


def trial_states(exp_dir: Path) -> dict[str, tuple[str, int]]:
    """Trial id -> (status, number of failures) in Tune's saved experiment state."""
    return {tid: (t["status"], t["failures"]) for tid, t in snapshot(exp_dir).items()}


def terminated(exp_dir: Path) -> set[str]:
    """The trials Tune's saved experiment state lists as finished."""
    return {tid for tid, (status, _) in trial_states(exp_dir).items() if status == "TERMINATED"}


def kill_mid_search(
    argv: list[str], *, work: Path, trial: int, after_epoch: int, ready: Callable[[], bool], what: str
) -> None:
    """Run the search ``argv`` in a driver process of its own (cwd ``work``, its output in
    ``work/first.log``) with its ``trial``-th trial held after epoch ``after_epoch``; once that trial is
    held and ``ready()`` says so, SIGKILL the driver, then let the held worker go. Fails if the search
    ends first. Experiment snapshots every second (Tune's default is >= 10 s), so the kill finds the
    finished trials in one."""
    log, hold = work / "first.log", work / "hold"
    hold.mkdir()
    spec = {"dir": str(hold), "hold": {"trial": trial, "after_epoch": after_epoch}}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, json.dumps(spec), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
            env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"},
        )
    try:
        deadline = time.monotonic() + 900  # a guard against a hang, not a wait (below pytest's timeout)
        while not ((hold / f"held-{trial}").exists() and ready()):
            assert proc.poll() is None, f"the search ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{what} not reached in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (hold / "release").touch()  # a worker still holding lets go


def main() -> int:
    spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
    import ray

    init = ray.init

    def init_with_hook(*args, **kwargs):
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env["worker_process_setup_hook"] = make_hook(spec)
        return init(*args, runtime_env=runtime_env, **kwargs)

    ray.init = init_with_hook
    from tune_rice.search import run as search

    return search.main(argv)


if __name__ == "__main__":
    sys.exit(main())
