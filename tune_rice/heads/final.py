"""The final model, decided on valid logits and assembled: the candidates (the trials' best checkpoints
and the linear probes), the choice between the single best and the selected ensemble, the deployed model
built from the choice, and the one scoring of the test split.

The numbers behind the choice (ensemble selection, temperature, calibration and confidence figures) are
numpy functions of logits in :mod:`tune_rice.heads.calibration`. Nothing here reads the test split before
:func:`score_final`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .. import UserError
from ..features.bank import FeatureBank, FeatureSpec
from ..features.model import (
    Classifier,
    Ensemble,
    FrozenBackbone,
    Head,
    ResolvedWeights,
    build_backbone,
    build_ensemble,
    build_head,
)
from ..records import Direction
from . import stats
from .calibration import (
    DEFAULT_ENSEMBLE,
    DEFAULT_ROUNDS,
    DEFAULT_TARGET_ACCURACY,
    Selection,
    calibration_metrics,
    coverage_curve,
    crossfit_calibration,
    crossfit_threshold,
    ensemble_logits,
    fit_temperature,
    reliability_bins,
    select_ensemble,
    softmax,
    suggest_threshold,
)
from .cv import fold_heads
from .engine import BankBatches, TrialConfig, predict_logits
from .finetune import stage_valid_logits, tuned_backbone, tuned_weights
from .probe import is_probe_id, probe_id

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ the decision
def valid_score(logits, targets, metric: str) -> float:
    """The search metric computed on valid logits (valid/acc, valid/macro_f1, valid/balanced_acc, or
    valid/loss = NLL); see :func:`tune_rice.heads.stats.score`."""
    return stats.score(logits, targets, metric)


@dataclass
class FinalChoice:
    """What the search deploys, all decided on valid: members, weights, temperature and the figures."""

    candidates: list[str]  # names, best-ranked first
    selection: Selection
    deployed: str  # "ensemble" | "single"
    members: list[str]  # the deployed members' names
    weights: list[float]
    temperature: float
    single_temperature: float  # the single best's own and the selected ensemble's own (each fitted on
    ensemble_temperature: float  # valid): the one not deployed is still scored on test, for the record
    valid: dict = field(default_factory=dict)  # {"single": {...}, "ensemble": {...}, "deployed_calibrated": {...}}
    threshold: dict = field(default_factory=dict)
    reliability: dict = field(default_factory=dict)  # {"before": bins, "after": bins} of the deployed model
    coverage: dict = field(default_factory=dict)
    metric: str = "valid/acc"
    mode: str = "max"
    lead: dict = field(default_factory=dict)  # the best trial against the linear probe (see lead_index)
    # each candidate's own temperature on valid (candidates' order): the ensemble is the weighted mean of
    # its members' logits each divided by its own, then divided by ``ensemble_temperature``
    candidate_temperatures: list[float] = field(default_factory=list)

    def mix(self, names: Sequence[str], weights: Sequence[float]) -> list[float]:
        """Each ensemble member's factor on its raw logits: its weight over its own temperature."""
        if not self.candidate_temperatures:  # a final.json from before members had their own
            return [float(w) for w in weights]
        return [float(w) / self.candidate_temperatures[self.candidates.index(n)] for n, w in zip(names, weights)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["selection"] = {**self.selection.to_dict(), "members": [self.candidates[i] for i in self.selection.members]}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FinalChoice:
        """The choice recorded by :meth:`to_dict` (final.json), so a resumed search does not choose again."""
        names = d["candidates"]
        sel = dict(d["selection"])
        sel["members"] = [names.index(m) for m in sel["members"]]
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "selection"}
        return cls(**fields, selection=Selection(**sel))


def decide(
    names: Sequence[str],
    logits_list: Sequence[np.ndarray],
    targets,
    *,
    k: int = DEFAULT_ENSEMBLE,
    metric: str = "valid/acc",
    mode: str = "max",
    rounds: int = DEFAULT_ROUNDS,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    baseline: bool = False,
    trials_run: int | None = None,
) -> FinalChoice:
    """Select an ensemble, decide it against the single best (``names[0]``), calibrate the deployed one.

    The ensemble is deployed when it has at least two distinct members and beats the single best on the
    search ``metric`` on valid (its valid NLL is lower by construction; a tie keeps the smaller model).
    When ``baseline`` (``names[0]`` is the linear probe, the simpler model), the ensemble must beat it by
    the rule that let the probe lead (:func:`tune_rice.heads.stats.lead_test`), counted as one more pick among
    the other candidates (``trials_run`` of them in the search). The temperature is fitted on the
    deployed model's valid logits.
    """
    if len(names) != len(logits_list):
        raise ValueError("one name per candidate")
    y = np.asarray(targets, dtype=np.int64)
    # each candidate at its own temperature: the selection then cannot favour a member for fixing an
    # overconfidence that temperature scaling fixes for free
    temperatures = [fit_temperature(z, y) for z in logits_list]
    calibrated = [np.asarray(z, dtype=np.float64) / t for z, t in zip(logits_list, temperatures)]
    sel = select_ensemble(calibrated, y, k=k, rounds=rounds, start=0)
    single = np.asarray(logits_list[0], dtype=np.float64)
    ens = ensemble_logits(calibrated, sel.members, sel.weights)
    use_ensemble, tested = _ensemble_wins(
        logits_list, ens, len(sel.members), y, metric=metric, mode=mode, baseline=baseline, trials_run=trials_run
    )
    members, weights = (sel.members, sel.weights) if use_ensemble else ([0], [1.0])
    deployed = ens if use_ensemble else single
    t_single, t_ens = temperatures[0], fit_temperature(ens, y)
    t = t_ens if use_ensemble else t_single
    p_before, p_after = softmax(deployed), softmax(deployed / t)
    threshold = suggest_threshold(p_after, y, target_accuracy=target_accuracy)
    return FinalChoice(
        candidates=list(names),
        selection=sel,
        deployed="ensemble" if use_ensemble else "single",
        members=[names[i] for i in members],
        weights=list(weights),
        temperature=t,
        single_temperature=t_single,
        ensemble_temperature=t_ens,
        valid={
            "single": calibration_metrics(single, y),
            "single_calibrated": calibration_metrics(single, y, temperature=t_single),
            "ensemble": calibration_metrics(ens, y),
            "ensemble_calibrated": calibration_metrics(ens, y, temperature=t_ens),
            "deployed": calibration_metrics(deployed, y),
            "deployed_calibrated": calibration_metrics(deployed, y, temperature=t),
            "deployed_crossfit": crossfit_calibration(deployed, y),
        },
        threshold={**threshold, "crossfit": crossfit_threshold(deployed, y, target_accuracy=target_accuracy)},
        reliability={"before": reliability_bins(p_before, y), "after": reliability_bins(p_after, y)},
        coverage=coverage_curve(p_after, y),
        metric=metric,
        mode=mode,
        lead={"ensemble": tested} if tested else {},
        candidate_temperatures=temperatures,
    )


def _ensemble_wins(
    logits_list: Sequence[np.ndarray],
    ens: np.ndarray,
    n_members: int,
    y: np.ndarray,
    *,
    metric: str,
    mode: str,
    baseline: bool,
    trials_run: int | None,
) -> tuple[bool, dict]:
    """Whether the selected ensemble (``ens``, its valid logits; ``n_members`` distinct members) is deployed
    instead of the single best (``logits_list[0]``), and the lead test when that is a probe (see
    :func:`decide`)."""
    single = np.asarray(logits_list[0], dtype=np.float64)
    s_single, s_ens = valid_score(single, y, metric), valid_score(ens, y, metric)
    tested: dict = {}
    if baseline and n_members > 1:
        family = [*logits_list[1:], ens]
        tested = stats.lead_test(
            family, single, y, metric=metric, mode=mode, lead=len(family) - 1, trials_run=trials_run
        )
        good_enough = tested["clear"]
    else:
        good_enough = Direction(mode).better(s_ens, s_single)
    use_ensemble = n_members > 1 and good_enough
    if n_members > 1 and not use_ensemble:
        log.info(
            "ensemble of %d not deployed: %s %.4f on valid vs the single best's %.4f",
            n_members,
            metric,
            s_ens,
            s_single,
        )
    return use_ensemble, tested


# ------------------------------------------------------------------------ candidates, model, test
@dataclass
class Candidate:
    """What may join the final model: a trial's best checkpoint (one head; a cross-validated trial's fold
    heads, averaged), its name (trial id), the bank it reads and its best value of the search metric.
    Its valid logits come from the bank, so no image is decoded."""

    name: str
    spec: FeatureSpec
    heads: list[Head]
    score: float = float("nan")
    # Out-of-fold logits over train+valid pooled (train rows first) for a cross-validated candidate, whose
    # heads saw valid in training: the choice is then made on these instead of the bank's valid split.
    oof_logits: np.ndarray | None = None
    baseline: bool = False  # the linear probe: the simpler model the search must clearly beat
    stage: dict | None = None  # a trial that tuned the last stage: the stage's state dict (finetune.py)

    def __post_init__(self):
        if isinstance(self.heads, Head):
            self.heads = [self.heads]
        if not self.heads:
            raise ValueError(f"candidate {self.name}: no head")


def candidate_from_state(name: str, state: dict, cfg: TrialConfig, *, score: float = float("nan")) -> Candidate:
    """A candidate from a trial checkpoint's state (``state.pt``): its head, or a cross-validated trial's
    K fold heads (``state["stack"]``) with the out-of-fold logits the checkpoint kept."""
    n_classes = len(state["classes"])
    if "stack" in state:
        oof = state.get("oof_logits")
        oof = oof.double().numpy() if oof is not None and oof.numel() else None
        return Candidate(name, cfg.feature_spec(), fold_heads(state, cfg, n_classes=n_classes), score, oof)
    head = build_head(
        cfg.head,
        in_dim=int(state["head"]["mean"].shape[0]),
        n_classes=n_classes,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
    )
    head.load_state_dict(state["head"])
    return Candidate(name, cfg.feature_spec(), [head.eval()], score, stage=state.get("stage"))


def probe_candidates(probes: dict, banks: dict[str, FeatureBank], *, metric: str) -> list[Candidate]:
    """The linear probe of each bank (``probe.fit_probes``) as final-model candidates, ``probe:<bank>``,
    scored by its valid (or out-of-fold) ``metric``."""
    key = metric.split("/", 1)[-1]
    return [
        Candidate(probe_id(name), banks[name].spec, [r.head], float(r.valid[key]), r.oof_logits, baseline=True)
        for name, r in probes.items()
    ]


def merge_candidates(candidates: Sequence[Candidate], extra: Sequence[Candidate], *, mode: str) -> list[Candidate]:
    """``candidates`` (the single best first) with ``extra`` ones (e.g. probes) placed among the others by
    score; the single best stays first: the selection starts from the search's own best trial."""
    if not candidates:
        return list(extra)
    sign = Direction(mode).sign
    rest = sorted([*candidates[1:], *extra], key=lambda c: -sign * c.score)  # stable: trials before probes on ties
    return [candidates[0], *rest]


def head_valid_logits(heads: Head | Sequence[Head], bank: FeatureBank) -> np.ndarray:
    """The heads (their mean) on view 0 of the bank's valid split, as the trials evaluate them: (N, C)."""
    heads = [heads] if isinstance(heads, Head) else list(heads)
    batches = BankBatches(bank.splits["valid"], batch_size=512, train=False)
    out = [predict_logits(h.cpu(), batches)[0].double().numpy() for h in heads]
    return np.mean(out, axis=0) if len(out) > 1 else out[0]


def candidate_pool(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates that can join the single best (``candidates[0]``): those taking its input (its
    preprocessing: size, resize, interpolation, mean and std, which differ between backbone families),
    since the deployed model reads one image tensor."""
    if not candidates:
        raise UserError("no trial left a checkpoint to build the final model from")
    first = candidates[0]
    pool = [c for c in candidates if c.spec.preprocessing == first.spec.preprocessing]
    if len(pool) < len(candidates):
        log.info(
            "ensemble candidates: %d of %d take the best trial's input (%s)",
            len(pool),
            len(candidates),
            first.spec.preprocessing,
        )
    return pool


def valid_logits_from_banks(
    pool: Sequence[Candidate], banks: dict[str, FeatureBank]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each candidate's valid logits (N, C) from its bank (no image decoded), and the valid targets.

    Cross-validated candidates (their heads trained on valid too) give their out-of-fold logits over
    train+valid pooled instead, and the targets are the pooled ones; the two kinds cannot be mixed."""
    oof = [c.oof_logits is not None for c in pool]
    if any(oof):
        if not all(oof):
            raise UserError(
                "the final choice cannot mix cross-validated candidates (scored out of fold on "
                "train+valid) with plain ones (scored on valid)"
            )
        splits = banks[pool[0].spec.name].splits
        targets = np.concatenate([splits["train"].targets, splits["valid"].targets])
        out = []
        for c in pool:
            rows = np.asarray(c.oof_logits, dtype=np.float64)
            if len(rows) != len(targets):
                raise RuntimeError(f"candidate {c.name}: {len(rows)} out-of-fold rows for {len(targets)}")
            out.append(rows)
        return out, targets
    reference = banks[pool[0].spec.name].splits["valid"]
    for c in pool:
        if banks[c.spec.name].splits["valid"].paths != reference.paths:
            raise RuntimeError(f"bank {c.spec.name}: its valid images differ from those of {pool[0].spec.name}")
    logits = [
        head_valid_logits(c.heads, banks[c.spec.name])
        if c.stage is None
        else stage_valid_logits(c.heads, c.stage, banks[c.spec.name])
        for c in pool
    ]
    return logits, np.asarray(reference.targets)


def valid_logits_from_images(
    pool: Sequence[Candidate],
    table,
    weights: dict[str, ResolvedWeights],
    *,
    device="auto",
    num_workers: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each candidate's valid logits from one decode of the valid images, each backbone run once: the
    path without banks (``--bank off``). Returns the logits and the valid targets."""
    from .engine import split_logits

    everyone, _, groups = _assemble(pool, [c.name for c in pool], [1.0 / len(pool)] * len(pool), 1.0, weights)
    z, y = split_logits(
        MemberLogits(everyone, groups), table, "valid", pool[0].spec.preprocessing, device, num_workers=num_workers
    )  # (N, M, C)
    zn = z.double().numpy()
    return [zn[:, i] for i in range(len(pool))], y.numpy()


def choose_final(
    pool: Sequence[Candidate],
    logits: Sequence[np.ndarray],
    targets,
    *,
    k: int = DEFAULT_ENSEMBLE,
    metric: str = "valid/acc",
    mode: str = "max",
    rounds: int = DEFAULT_ROUNDS,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    trials_run: int | None = None,
) -> FinalChoice:
    """:func:`decide` over the pool's valid logits, led by the search's best trial or, when that does not
    beat the best linear probe by more than picking the best of ``trials_run`` trials explains
    (:func:`lead_index`), by that probe. ``choice.candidates`` lists the names in the order decided on:
    the leader first."""
    lead, record = lead_index(pool, logits, targets, metric=metric, mode=mode, trials_run=trials_run)
    order = [lead, *(i for i in range(len(pool)) if i != lead)]
    choice = decide(
        [pool[i].name for i in order],
        [logits[i] for i in order],
        targets,
        k=k,
        metric=metric,
        mode=mode,
        rounds=rounds,
        target_accuracy=target_accuracy,
        baseline=pool[lead].baseline,
        trials_run=trials_run,
    )
    choice.lead = {**record, **choice.lead}
    return choice


def lead_index(
    pool: Sequence[Candidate],
    logits: Sequence[np.ndarray],
    targets,
    *,
    metric: str,
    mode: str,
    trials_run: int | None = None,
) -> tuple[int, dict]:
    """Who leads the final model: the best trial (the first in ``pool`` that is not a probe) when it beats
    the best linear probe in the pool on valid by more than picking the best of the search's trials gives
    by chance (:func:`tune_rice.heads.stats.lead_test`: every trial in the pool is resampled with it, and the
    ``trials_run`` the search ran are counted), else that probe.

    Why: the best trial's valid figure is the best of many trials and epochs on the same images, so it
    is biased upward by the choice itself (the winner's curse), while the probe's is one of a few values
    of C. Returns the index and the record final.json keeps as ``lead`` (empty when the pool holds no
    probe or no trial); its ``clear`` is the search's one verdict against the probe."""
    probes = [i for i, c in enumerate(pool) if c.baseline]
    trials = [i for i, c in enumerate(pool) if not c.baseline]
    if not probes or not trials:
        return 0, {}
    sign = Direction(mode).sign
    best = max(probes, key=lambda i: (sign * valid_score(logits[i], targets, metric), -i))
    test = stats.lead_test(
        [logits[i] for i in trials], logits[best], targets, metric=metric, mode=mode, trials_run=trials_run
    )
    lead = trials[0] if test["clear"] else best
    record = {**test, "trial": pool[trials[0]].name, "probe": pool[best].name, "leader": pool[lead].name}
    log.info(
        "%s leads the final model: the best trial's %s lead over the probe %s on valid, %+.4f, has p = %.3g "
        "given the best of %d trials was picked (lead when <= %g)",
        pool[lead].name,
        metric,
        pool[best].name,
        test["advantage"],
        test["p_value"],
        test["trials"],
        test["alpha"],
    )
    return lead, record


def lead_gap(lead: dict, metric: str) -> str:
    """``valid/acc +0.0500 on 300 images, p = 0.012 given the best of 30 trials was picked``."""
    return (
        f"{metric} {lead['advantage']:+.4f} on {lead['count']} images, p = {lead['p_value']:.3g} given the best "
        f"of {lead['trials']} trials was picked"
    )


def lead_lines(record: dict) -> list[str]:
    """The summary's line on who led the final model (final.json's ``lead``), or none."""
    lead = record.get("lead") or {}
    if "trial" not in lead:
        return []
    gap = lead_gap(lead, record["metric"])
    if lead["leader"] == lead["trial"]:
        return [f"  the best trial led the final model: it beat the linear probe on valid ({gap} <= {lead['alpha']:g})"]
    return [
        f"  the best trial's lead over the linear probe on valid is what picking the best gives by chance ({gap} "
        f"> {lead['alpha']:g}): the simpler probe led the final model"
    ]


def _assemble(
    pool: Sequence[Candidate],
    names: Sequence[str],
    mix: Sequence[float],
    temperature: float,
    weights: dict[str, ResolvedWeights],
) -> tuple[Classifier | Ensemble, list[ResolvedWeights], list[int]]:
    """The model of candidates ``names`` weighted ``mix``: a candidate with K heads (fold heads) adds K
    heads of weight w/K. Returns the model, each distinct backbone's weights, and each head's position
    in ``names``."""
    by_name = {c.name: c for c in pool}
    built: dict[tuple, tuple] = {}
    members, head_weights, head_names, groups = [], [], [], []
    for i, (name, w) in enumerate(zip(names, mix)):
        spec, heads = by_name[name].spec, by_name[name].heads
        # a tuned stage makes a backbone of its own: the frozen one with the candidate's stage in it
        tuned = by_name[name].stage is not None
        key = (spec.backbone, spec.feature_layer, spec.seed, name if tuned else "")
        if tuned:
            built[key] = _tuned(by_name[name], weights[spec.backbone])
        elif key not in built:
            built[key] = build_backbone(
                spec.backbone, weights=weights[spec.backbone], seed=spec.seed, feature_layer=spec.feature_layer
            )
        for j, head in enumerate(heads):
            members.append(Classifier(built[key][0], head.cpu()))
            head_weights.append(float(w) / len(heads))
            head_names.append(name if len(heads) == 1 else f"{name}/fold{j}")
            groups.append(i)
    model = build_ensemble(members, weights=head_weights, temperature=temperature, names=head_names).eval()
    backbones = list(model.backbones) if isinstance(model, Ensemble) else [model.backbone]
    resolved = {id(b): r for b, r in built.values()}
    return model, [resolved[id(b)] for b in backbones], groups


def _tuned(candidate: Candidate, resolved: ResolvedWeights) -> tuple[FrozenBackbone, ResolvedWeights]:
    """A tuned-stage candidate's backbone: its weights with its trial's last stage, pooled features."""
    spec = candidate.spec
    backbone, _ = build_backbone(spec.backbone, weights=resolved, seed=spec.seed)
    assert candidate.stage is not None
    return tuned_backbone(backbone, candidate.stage), tuned_weights(resolved, candidate.name)


def build_final_model(
    choice: FinalChoice, pool: Sequence[Candidate], weights: dict[str, ResolvedWeights], *, selection: bool = False
) -> tuple[Classifier | Ensemble, list[ResolvedWeights], list[int]]:
    """The deployed model of ``choice`` (``selection=True``: the selected ensemble, deployed or not):
    each member's head(s) on its frozen backbone (built once per backbone, layer and seed), weighted, with
    the fitted temperature. Also returns the weights of each distinct backbone, in the model's order
    (what ``save_artifact`` records), and each head's member position (for :class:`MemberLogits`)."""
    if selection:
        names = scored_names(choice)
        k = len(choice.selection.members)
        mix = [*choice.mix(names[:k], choice.selection.weights), *[0.0] * (len(names) - k)]
        return _assemble(pool, names, mix, choice.ensemble_temperature, weights)
    if choice.deployed == "ensemble":
        return _assemble(pool, choice.members, choice.mix(choice.members, choice.weights), choice.temperature, weights)
    return _assemble(pool, choice.members, choice.weights, choice.temperature, weights)


def scored_names(choice: FinalChoice) -> list[str]:
    """The candidates the one test pass scores: the selected ensemble's members, then the best trial and
    the linear probe the lead rule compared (``choice.lead``) where they are not members (weight 0 in
    the selected model), so that test can report the deployed model against the probe."""
    names = [choice.candidates[i] for i in choice.selection.members]
    return names + [
        n for n in dict.fromkeys((choice.lead.get("trial"), choice.lead.get("probe"))) if n and n not in names
    ]


class MemberLogits(nn.Module):
    """Images (B, 3, S, S) -> each member's own logits (B, M, C), before weights and temperature, one
    pass per backbone (a member with several heads: their mean; ``groups``: each head's member).
    Over the selected ensemble, one decode of the test split scores the deployed model, the single best
    (member 0: the selection starts from it) and the ensemble together."""

    def __init__(self, model: Classifier | Ensemble, groups: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        self.groups = list(groups) if groups is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.model, Ensemble):
            return self.model.head(self.model.backbone(x))[:, None]
        heads = self.model.member_logits(x)
        groups = self.groups if self.groups is not None else list(range(len(heads)))
        members = [torch.stack([z for z, g in zip(heads, groups) if g == m]).mean(0) for m in range(max(groups) + 1)]
        return torch.stack(members, dim=1)


def record_test_scores(member_logits, targets, classes: Sequence[str], choice: FinalChoice) -> dict:
    """test_metrics.json from the selected ensemble's members' test logits (N, M, C), members in
    ``choice.selection`` order: the deployed model's metrics at the top level (calibrated logits), its
    calibration before/after the temperature, and ``single_best`` and ``ensemble`` (when the selection has
    several members) each with its own temperature, marked ``deployed`` or not."""
    from .engine import metrics_record

    z = np.asarray(member_logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    names = scored_names(choice)
    if z.shape[1] != len(names):
        raise ValueError(f"logits of {z.shape[1]} members for {len(names)} scored ({', '.join(names[:3])}...)")
    yt = torch.from_numpy(y)
    k = len(choice.selection.members)
    raw = {
        "single": z[:, 0],
        "ensemble": np.einsum("nmc,m->nc", z[:, :k], np.asarray(choice.mix(names[:k], choice.selection.weights))),
    }
    temperature = {"single": choice.single_temperature, "ensemble": choice.ensemble_temperature}

    def scored(which: str) -> dict:
        m = metrics_record(torch.from_numpy(raw[which] / temperature[which]), yt, classes)
        return {
            **m,
            **test_intervals(raw[which], y),
            "temperature": temperature[which],
            "calibration": {
                "before": calibration_metrics(raw[which], y),
                "after": calibration_metrics(raw[which], y, temperature=temperature[which]),
            },
        }

    deployed = scored(choice.deployed)
    out = {**deployed, "deployed": choice.deployed, "members": list(choice.members)}
    out["predictions"] = raw[choice.deployed].argmax(1).tolist()  # per test image (the data audit's use)
    out["member_weights"] = list(choice.weights)  # "weights" in test_metrics.json is the backbone identity
    keep = (
        "accuracy",
        "accuracy_interval",
        "macro_f1",
        "macro_f1_interval",
        "loss",
        "test_count",
        "temperature",
        "calibration",
    )
    single = deployed if choice.deployed == "single" else scored("single")
    out["single_best"] = {
        "trial_id": choice.candidates[0],
        "deployed": choice.deployed == "single",
        **{k: single[k] for k in keep},
    }
    if len(choice.selection.members) > 1:
        ens = deployed if choice.deployed == "ensemble" else scored("ensemble")
        out["ensemble"] = {
            "members": [choice.candidates[i] for i in choice.selection.members],
            "member_weights": list(choice.selection.weights),
            "deployed": choice.deployed == "ensemble",
            **{k: ens[k] for k in keep},
        }
    shown = raw[choice.deployed]
    out["threshold"] = threshold_on_test(softmax(shown / temperature[choice.deployed]), y, choice.threshold)
    out["compared"] = {
        role: compared_on_test(z[:, names.index(name)], shown, y, name)
        for role, name in (("trial", choice.lead.get("trial")), ("probe", choice.lead.get("probe")))
        if name and not (choice.deployed == "single" and name == choice.candidates[0])
    }
    return out


def threshold_on_test(probs, targets, valid_threshold: dict) -> dict:
    """What the threshold suggested on valid (``--min-confidence``) does on test: the share of test images
    at or above it and the accuracy among them, beside its target. Empty when valid suggested none."""
    th = valid_threshold.get("threshold")
    if th is None:
        return {}
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    keep = p.max(1) >= th
    return {
        "threshold": float(th),
        "target_accuracy": valid_threshold["target_accuracy"],
        "coverage": float(keep.mean()) if len(y) else 0.0,
        "accuracy": float((p.argmax(1)[keep] == y[keep]).mean()) if keep.any() else None,
        "kept": int(keep.sum()),
    }


def test_intervals(logits, targets) -> dict:
    """95% intervals of a test figure: Wilson for the accuracy, a percentile bootstrap for macro-F1."""
    from .probe import wilson_interval

    y = np.asarray(targets, dtype=np.int64)
    right = int((np.asarray(logits).argmax(1) == y).sum())
    return {
        "accuracy_interval": list(wilson_interval(right, len(y))),
        "macro_f1_interval": list(stats.bootstrap_interval(logits, y, "macro_f1")),
    }


def compared_on_test(logits, deployed_logits, targets, name: str) -> dict:
    """A candidate the deployed model was chosen over (the probe, or the best trial), scored in the same
    test pass: its accuracy and macro-F1 with intervals, and the exact McNemar test of the deployed model
    against it on the same images (``deployed_only``: images only the deployed model got right). A figure
    to read, never a choice: the test split decides nothing."""
    y = np.asarray(targets, dtype=np.int64)
    m = stats.mcnemar(deployed_logits, logits, y)
    return {
        "trial_id": name,
        "accuracy": stats.score(logits, y, "acc"),
        "macro_f1": stats.score(logits, y, "macro_f1"),
        **test_intervals(logits, y),
        "mcnemar": {"deployed_only": m["a_only"], "other_only": m["b_only"], "p_value": m["p_value"]},
    }


# ---------------------------------------------------------------------------------- the final phase
@dataclass
class FinalModel:
    """What the search deploys and how it was chosen: ``model`` (saved as best/model.pt), and ``selected``
    (the selected ensemble, the same object when deployed) whose members one test pass scores."""

    choice: FinalChoice
    pool: list[Candidate]
    model: Classifier | Ensemble
    resolved: list[ResolvedWeights]  # the weights of each distinct backbone of ``model``
    selected: Classifier | Ensemble
    groups: list[int]  # each head of ``selected``: its member
    seconds: dict = field(default_factory=dict)

    @property
    def single_best(self) -> Candidate:
        return self.pool[0]

    def record(self) -> dict:
        """final.json: the choice, the candidates' names, scores and settings, the seconds it took."""
        info = [
            {
                "name": c.name,
                "score": c.score,
                "backbone": c.spec.backbone,
                "image_size": c.spec.image_size,
                "head": c.heads[0].kind,
                "hidden": c.heads[0].hidden,
                "heads": len(c.heads),
                "cross_validated": c.oof_logits is not None,
            }
            for c in self.pool
        ]
        return {**self.choice.to_dict(), "candidate_info": info, "seconds": self.seconds}


def make_final_model(
    candidates: Sequence[Candidate],
    *,
    weights: dict[str, ResolvedWeights],
    banks: dict[str, FeatureBank] | None = None,
    table=None,
    k: int = DEFAULT_ENSEMBLE,
    metric: str = "valid/acc",
    mode: str = "max",
    recorded: dict | None = None,
    device="auto",
    trials_run: int | None = None,
) -> FinalModel:
    """Choose (or, with ``recorded`` final.json, re-use the recorded choice) and build the final model.

    Valid logits come from ``banks`` (no image decoded) or, without banks, from one decode of the valid
    images of ``table``. ``trials_run``: how many trials the search ran (the lead rule counts them all).
    Nothing here reads the test split.
    """
    t0 = time.perf_counter()
    pool = candidate_pool(candidates)
    seconds = {}
    if recorded is not None:
        choice = FinalChoice.from_dict(recorded)
        by_name = {c.name: c for c in pool}
        missing = [n for n in choice.candidates if n not in by_name]
        if missing:
            raise UserError(f"final.json names candidates the experiment no longer has: {', '.join(missing[:2])}")
        pool = [by_name[n] for n in choice.candidates]
        seconds = dict(recorded.get("seconds", {}))
    else:
        if banks is not None:
            logits, targets = valid_logits_from_banks(pool, banks)
        else:
            logits, targets = valid_logits_from_images(pool, table, weights, device=device)
        seconds["valid_logits"] = time.perf_counter() - t0
        t = time.perf_counter()
        choice = choose_final(pool, logits, targets, k=k, metric=metric, mode=mode, trials_run=trials_run)
        by_name = {c.name: c for c in pool}
        pool = [by_name[n] for n in choice.candidates]  # the leader first: FinalModel.single_best
        seconds["select_and_calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    model, resolved, _ = build_final_model(choice, pool, weights)
    if choice.deployed == "ensemble" and len(scored_names(choice)) == len(choice.selection.members):
        selected, groups = model, _groups(choice, pool)
    else:
        selected, _, groups = build_final_model(choice, pool, weights, selection=True)
    if recorded is None:
        seconds["build"] = time.perf_counter() - t
    log.info(
        "final model: %s of %d (%s), temperature %.3g; chosen on valid among %d candidates",
        choice.deployed,
        len(choice.members),
        ", ".join(f"{m} {w:.2f}" for m, w in zip(choice.members, choice.weights)),
        choice.temperature,
        len(pool),
    )
    return FinalModel(choice, pool, model, resolved, selected, groups, seconds)


def _groups(choice: FinalChoice, pool: Sequence[Candidate]) -> list[int]:
    by_name = {c.name: c for c in pool}
    return [i for i, name in enumerate(choice.members) for _ in by_name[name].heads]


def score_final(fm: FinalModel, table, *, device="auto", batch_size: int = 64) -> dict:
    """The one read of the test split: the selected ensemble's members on the test images, decoded once;
    the deployed model's figures at the top level, the single best and the ensemble beside them."""
    from .engine import split_logits

    z, y = split_logits(
        MemberLogits(fm.selected, fm.groups),
        table,
        "test",
        fm.single_best.spec.preprocessing,
        device,
        batch_size=batch_size,
    )
    return record_test_scores(z.double().numpy(), y.numpy(), table.classes, fm.choice)


def single_best_label(record: dict) -> str:
    """What the single best candidate of a test record is: a trial, or the linear probe when it led."""
    return "linear probe" if is_probe_id(record.get("trial_id", "")) else "single best trial"


def deployed_label(record: dict, *, heads: bool = False) -> str:
    """What a test record's deployed model is: the ensemble of n, the linear probe, or the best trial's best
    checkpoint (``heads``: "of n heads")."""
    if record.get("deployed") == "ensemble":
        return f"the deployed ensemble of {len(record['members'])}" + (" heads" if heads else "")
    return "the linear probe" if is_probe_id(record.get("trial_id", "")) else "the best trial's best checkpoint"


def test_figures(record: dict) -> str:
    """``accuracy 0.8400 [0.79, 0.88], macro-F1 0.8100 [0.75, 0.86]``: a test record's figures with
    their 95% intervals (where the record has them)."""

    def with_interval(key: str) -> str:
        lo_hi = record.get(f"{key}_interval")
        return f"{record[key]:.4f}" + (f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "")

    return f"accuracy {with_interval('accuracy')}, macro-F1 {with_interval('macro_f1')}"


def comparison_lines(test: dict) -> list[str]:
    """The test pass's paired comparison of the deployed model with the probe (or the best trial) it was
    chosen over, as one line each: reported, never used to choose."""
    lines = []
    for role, other in (test.get("compared") or {}).items():
        m = other["mcnemar"]
        what = "the linear probe" if role == "probe" else "the best trial"
        lines.append(
            f"{what} ({other['trial_id']}) on test, same pass, not chosen on it: {test_figures(other)}; "
            f"the deployed model was right on {m['deployed_only']} image{'' if m['deployed_only'] == 1 else 's'} "
            f"it got wrong and wrong on "
            f"{m['other_only']} it got right (exact McNemar p = {m['p_value']:.3g})"
        )
    return lines


def valid_ece_text(valid: dict) -> str:
    """``valid ECE 0.120 -> 0.045 cross-fitted (0.031 in-sample)``: the temperature's effect on valid, on
    images it was not fitted on where final.json has that figure."""
    before, after = valid["deployed"]["ece"], valid["deployed_calibrated"]["ece"]
    crossfit = valid.get("deployed_crossfit")
    if crossfit is None:
        return f"valid ECE {before:.3f} -> {after:.3f} in-sample"
    return f"valid ECE {before:.3f} -> {crossfit['ece']:.3f} cross-fitted ({after:.3f} in-sample)"


def threshold_lines(th: dict, *, split: str = "valid") -> list[str]:
    """The suggested ``--min-confidence`` and what it keeps: on valid, in-sample (it was chosen there) and
    cross-fitted (chosen on the other folds); on test, against its target."""
    if not th.get("threshold"):
        return []
    target = f"target {th['target_accuracy']:.0%}"
    if split == "test":
        acc = "no image" if th["accuracy"] is None else f"{th['accuracy']:.1%} accuracy"
        return [f"--min-confidence {th['threshold']:.3g} on test: keeps {th['coverage']:.0%} at {acc} ({target})"]
    line = (
        f"predict --min-confidence {th['threshold']:.3g} keeps {th['coverage']:.0%} of valid at "
        f"{th['accuracy']:.1%} accuracy in-sample ({target})"
    )
    crossfit = th.get("crossfit")
    if crossfit:
        acc = "no image" if crossfit["accuracy"] is None else f"{crossfit['accuracy']:.1%}"
        line += f"; chosen on the other folds of valid it kept {crossfit['coverage']:.0%} at {acc}"
    return [line + "; the rest 'uncertain'"]
