"""Federated rounds in one process: the simulation the tests and benchmarks run, and the reference
for the rounds Airflow orchestrates across sites (same steps, with packages between them).

A round: every participant starts from the global state and trains locally (`local_update`);
a participant past the deadline is a straggler and left out of the round; the coordinator
aggregates the updates of the others by the rule and moves the global state
(McMahan et al. 2017, FedAvg; Li et al. 2020, FedProx; the robust rules of `aggregation`).
Optionally the updates are clipped and noised (`privacy`, DP-FedAvg) and summed under secure
aggregation (`secure`, Bonawitz et al. 2017), where a straggler is a dropout the survivors' shares
recover. The rounds stop at the round budget or when the global metric changes less than `tol`.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.data.spec import DataSpec
from pipelines.federated.aggregation import RULES, SUM_RULES, AggregationError, aggregate, selected_by_krum
from pipelines.federated.privacy import (
    UpdatePrivacy,
    clip_update,
    effective_noise_multiplier,
    epsilon,
    gaussian_noise,
    participant_noise_std,
)
from pipelines.federated.secure import SecAggError, secure_sum
from pipelines.federated.updates import (
    FederatedError,
    LocalConfig,
    StateLayout,
    apply_update,
    evaluate_state,
    local_update,
)


@dataclass
class Participant:
    """One unit taking part: a site may hold several (e.g. `origin/unit-a`, `origin/unit-b`), each
    with its own rows. `x_test`/`y_test`: the unit's own evaluation rows (the global model is
    evaluated there each round). `delay_s` and `attack` are for simulation only: latency added to
    the unit's measured training time, a transform of its update and the sample count it claims
    (a poisoned participant: FedAvg weighs by what a participant says it trained on)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    site: str = ""
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    delay_s: float = 0.0
    attack: Callable[[np.ndarray], np.ndarray] | None = None
    claimed_samples: int | None = None


def scaled(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    """A poisoned participant's attack: its honest update times `factor`."""
    return lambda delta: (np.asarray(delta) * factor).astype(np.float32)


def sign_flipped(factor: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """A poisoned participant's attack: its honest update reversed (and times `factor`)."""
    return scaled(-factor)


@dataclass
class RoundRecord:
    round: int
    included: list[str]
    stragglers: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    participant_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    update_norms: dict[str, float] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: int = 0
    kept: list[str] = field(default_factory=list)
    noise_multiplier: float | None = None
    epsilon: float | None = None
    skipped: str | None = None
    seconds: float = 0.0


@dataclass
class FederatedResult:
    state: dict[str, torch.Tensor]
    history: list[RoundRecord]
    stopped: str  # "rounds" (the budget) or "converged"

    @property
    def epsilon(self) -> float | None:
        return self.history[-1].epsilon if self.history else None


def check_round_plan(rule: str, n: int, *, secure: bool, privacy: UpdatePrivacy | None, local: LocalConfig,
                     f: int = 1, beta: float = 0.1, m: int | None = None) -> None:
    """Refuse a plan that cannot run with `n` participants, before any round starts."""
    if rule not in RULES:
        raise FederatedError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    if local.mu > 0 and rule != "fedprox":
        raise FederatedError(f"a proximal term (mu={local.mu}) is FedProx's local step; the rule is {rule!r}")
    if (secure or privacy is not None) and rule not in SUM_RULES:
        what = "secure aggregation reveals only the sum" if secure else "DP-FedAvg's accountant covers the mean"
        raise FederatedError(f"rule {rule!r} needs each update in the clear; {what}: use fedavg or fedprox")
    if privacy is not None and privacy.noise == "distributed" and not secure:
        raise FederatedError("distributed noise is enough only in the sum: it needs secure aggregation "
                             "(or use central noise)")
    if n < 1:
        raise FederatedError("no participants")
    if secure and n < 3:
        raise FederatedError(f"secure aggregation needs at least 3 participants; there are {n}")
    probe = [np.zeros(1, np.float32) + i for i in range(n)]
    try:
        aggregate(rule, probe, [1.0] * n, f=f, beta=beta, m=m)
    except AggregationError as exc:
        raise FederatedError(str(exc)) from None


def run_rounds(
    global_state: Mapping[str, torch.Tensor],
    participants: Sequence[Participant],
    rule: str = "fedavg",
    rounds: int = 5,
    *,
    architecture: Mapping[str, Any],
    spec: DataSpec,
    local: LocalConfig | None = None,
    evaluate: Callable[[Mapping[str, torch.Tensor]], dict[str, float]] | None = None,
    metric: str = "accuracy",
    tol: float | None = None,
    deadline_s: float | None = None,
    secure: bool = False,
    threshold: int | None = None,
    privacy: UpdatePrivacy | None = None,
    f: int = 1,
    beta: float = 0.1,
    m: int | None = None,
    seed: int = 0,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> FederatedResult:
    """Run up to `rounds` rounds from `global_state` with `participants` and the aggregation `rule`.

    `evaluate(state) -> {metric: value}` scores the global model after each round (the convergence
    rule reads `metric`: stop once it changes by less than `tol`). `deadline_s`: a participant whose
    training (plus its simulated delay) takes longer is left out of the round. `secure`: updates are
    summed under secure aggregation (`threshold` shares of n rebuild a dropout's masks). `privacy`:
    DP-FedAvg clipping and noise, epsilon recorded per round. `f`, `beta`, `m`: the robust rules'."""
    local = local or LocalConfig()
    names = [p.name for p in participants]
    if len(set(names)) != len(names):
        raise FederatedError(f"participant names repeat: {names}")
    check_round_plan(rule, len(participants), secure=secure, privacy=privacy, local=local, f=f, beta=beta, m=m)
    if tol is not None and evaluate is None:
        raise FederatedError("a convergence tolerance needs an evaluate function")
    state = {k: v.detach().clone() for k, v in global_state.items()}
    layout = StateLayout.of(state)
    rng = np.random.default_rng(seed)
    history: list[RoundRecord] = []
    sigmas: list[float] = []
    previous: float | None = None
    stopped = "rounds"
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        record = RoundRecord(number, [], [], bytes_down=4 * layout.size)
        updates: dict[str, np.ndarray] = {}
        weights: dict[str, float] = {}
        for participant in participants:
            begin = time.perf_counter()
            update = local_update(state, participant.x, participant.y, architecture=architecture, spec=spec,
                                  config=local, seed=_unit_seed(seed, number, participant.name), who=participant.name)
            elapsed = time.perf_counter() - begin + participant.delay_s
            record.participant_metrics[participant.name] = {**update.metrics, "seconds": elapsed}
            if deadline_s is not None and elapsed > deadline_s:
                record.stragglers.append(participant.name)
                continue
            delta = participant.attack(update.delta) if participant.attack else update.delta
            record.update_norms[participant.name] = float(np.linalg.norm(delta))
            if privacy is not None:
                delta, _ = clip_update(delta, privacy.clip_norm)
                std = participant_noise_std(privacy, len(participants))
                if std:
                    delta = (delta + gaussian_noise(len(delta), std, rng)).astype(np.float32)
            updates[participant.name] = delta
            claimed = participant.claimed_samples or update.n_samples
            weights[participant.name] = 1.0 if privacy is not None else float(claimed)
        record.included = list(updates)
        try:
            aggregated = _aggregate(rule, updates, weights, record, secure=secure, threshold=threshold,
                                    privacy=privacy, n_expected=len(participants), rng=rng, f=f, beta=beta, m=m,
                                    round_id=f"{seed}-{number}")
        except (AggregationError, SecAggError) as exc:
            record.skipped = str(exc)
            aggregated = None
        if aggregated is not None:
            state = apply_update(state, aggregated)
            if record.noise_multiplier is not None:
                sigmas.append(record.noise_multiplier)
        if privacy is not None:
            record.epsilon = epsilon(sigmas, sample_rate=1.0, delta=privacy.delta) if sigmas else 0.0
        for participant in participants:
            if participant.x_test is not None and participant.y_test is not None:
                scores = evaluate_state(state, participant.x_test, participant.y_test, architecture=architecture, spec=spec)
                record.participant_metrics[participant.name].update({f"global_{k}": v for k, v in scores.items()})
        if evaluate is not None:
            record.metrics = dict(evaluate(state))
        record.seconds = time.perf_counter() - started
        history.append(record)
        if on_round:
            on_round(record)
        if tol is not None and metric in record.metrics and aggregated is not None:
            current = float(record.metrics[metric])
            if previous is not None and abs(current - previous) < tol:
                stopped = "converged"
                break
            previous = current
    return FederatedResult(state, history, stopped)


def _unit_seed(seed: int, number: int, name: str) -> int:
    """A participant's training seed for a round: its own, whoever else takes part."""
    return (seed * 1_000_003 + 7919 * number + zlib.crc32(name.encode())) % 2**31


def _aggregate(rule: str, updates: dict[str, np.ndarray], weights: dict[str, float], record: RoundRecord, *,
               secure: bool, threshold: int | None, privacy: UpdatePrivacy | None, n_expected: int,
               rng: np.random.Generator, f: int, beta: float, m: int | None, round_id: str) -> np.ndarray | None:
    if not updates:
        raise AggregationError("no participant sent an update in time")
    names = list(updates)
    if privacy is not None:
        record.noise_multiplier = effective_noise_multiplier(privacy, n_expected, len(names))
    if secure:
        # Weighted sums travel as n_k * delta_k with n_k appended: the coordinator learns the total only.
        payloads = {name: np.append(updates[name].astype(np.float64) * weights[name], weights[name]) for name in names}
        stragglers = list(record.stragglers)
        # Stragglers had shared their keys before training: they are dropouts the survivors' shares recover.
        payloads.update({name: np.zeros(len(payloads[names[0]])) for name in stragglers})
        total, sent = secure_sum(payloads, round_id=round_id, dropped_after_sharing=stragglers, threshold=threshold)
        record.bytes_up = sent
        summed, count = total[:-1], float(total[-1])
    else:
        record.bytes_up = {name: 4 * len(updates[name]) for name in names}
        if privacy is None:
            if rule in ("krum", "multi_krum"):
                keep = 1 if rule == "krum" else (m if m is not None else len(names) - f)
                record.kept = [names[i] for i in selected_by_krum([updates[n] for n in names], f=f, m=keep)]
            return aggregate(rule, [updates[n] for n in names], [weights[n] for n in names], f=f, beta=beta, m=m)
        summed = np.sum([updates[n].astype(np.float64) for n in names], axis=0)
        count = float(len(names))
    if privacy is not None and privacy.noise == "central":
        summed = summed + gaussian_noise(len(summed), privacy.noise_multiplier * privacy.clip_norm, rng)
    return (summed / count).astype(np.float32)
