"""The lead rule's error rates by simulation: how often the best of K trials leads the linear probe
under the rule the search uses (stats.lead_test: White's reality check, studentised, floored by the exact
sign test) and under the one-standard-error rule it replaced, with and without a real advantage.

Models are right on an image when ``mu + u + shared*v + own*e > 0`` (``u``: the image's easiness, shared
by all; ``v``: shared by the trials only; ``e``: each model's own): see ``stats.simulate_lead``. No
images and no training: numbers only, seconds.

    python benchmarks/bench_lead.py          # writes benchmarks/results/lead_rule.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import run_info  # noqa: E402

from tune_rice.heads.stats import simulate_lead  # noqa: E402

# (shared, own): how the trials' errors go together. (0.3, 0.3): trial and probe disagree on about 1
# image in 8 at 80% accuracy; (0.5, 0.2): trials much alike; (0.0, 0.6): trials no more alike than the
# probe; (0.1, 0.1): all models nearly agree.
CORRELATIONS = [(0.3, 0.3), (0.5, 0.2), (0.0, 0.6), (0.1, 0.1)]
SCENARIOS = [
    # (trials, images, advantage, only_one)
    (30, 300, 0.0, False),
    (30, 300, 0.05, False),
    (30, 300, 0.05, True),
    (6, 300, 0.0, False),
    (6, 300, 0.05, False),
    (30, 100, 0.0, False),
    (30, 100, 0.05, False),
    (30, 1000, 0.0, False),
    (30, 1000, 0.05, False),
]


def main() -> None:
    rows = []
    t0 = time.perf_counter()
    for trials, images, advantage, only_one in SCENARIOS:
        for shared, own in CORRELATIONS:
            r = simulate_lead(
                advantage=advantage, trials=trials, images=images, shared=shared, own=own, only_one=only_one
            )
            rows.append(r)
            print(
                f"best of {trials:2d} on {images:4d} images, advantage {advantage:.2f}"
                f"{' (one trial)' if only_one else '            '} shared {shared} own {own}: "
                f"lead {r['lead_rate']:.3f} (one-SE rule {r['one_se_rate']:.3f}), disagreement {r['disagreement']:.3f}",
                flush=True,
            )
    out = {**run_info(), "seconds": time.perf_counter() - t0, "rows": rows}
    path = ROOT / "benchmarks" / "results" / "lead_rule.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
