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
"""

from __future__ import annotations

import json
import sys


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


def main() -> int:
    spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
    import ray

    init = ray.init

    def init_with_hook(*args, **kwargs):
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env["worker_process_setup_hook"] = make_hook(spec)
        return init(*args, runtime_env=runtime_env, **kwargs)

    ray.init = init_with_hook
    from tune_rice import search

    return search.main(argv)


if __name__ == "__main__":
    sys.exit(main())
