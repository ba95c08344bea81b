"""Federated rounds across the sites (issue 20): the model travels, the data stays.

A stage whose conf/stages.yaml `collaboration` is `federated` trains its model in rounds instead
of receiving the partner's data (`federated.<stage>`, pipelines/config.py FederatedStage):

- the coordinator (the stage's site, the supplier) starts a training with `start=True`: the global
  model is the base model (M1) and each round it seals the global weights (`federated-model`
  packages, through the `model_release` gate with purpose collaboration) to every participant site,
  and trains its own units at home;
- a participant site (`federated_participate`) opens the global package, checks it against the base
  model it verified and registered itself (sender, training, round, digest, size), trains each of
  its units on its own share of its data (`pipelines.federated.local_update`), evaluates the global
  model on its own test data (its MLflow), and seals the units' update vectors and row counts (never
  a row: `federated-update` packages) back through the same `model_release` gate, which is the
  data owner's decision (its lineage names the owner's dataset, with the `dp` spend under privacy);
- the coordinator (`federated_coordinate`, run on each update's arrival and on its poll cron) opens
  the updates of the round, leaves out a site past the round's deadline, aggregates by the
  configured rule, evaluates on its test data, logs the round to one MLflow run (step = round), and
  either starts the next round or stages the result for the ordinary evaluate → export → register
  steps of centralized training (metadata.json `federated`: rounds, rule, the bytes that crossed).

Names in a package (training id, units, round) are compared with what this site expects and never
joined into a path.

Secure aggregation (`secure_aggregation: true`, 3 or more units; pipelines/federated/secure.py,
Bonawitz et al.) runs in the same packages and DAG runs, as phases of a training: `keys` (each unit
makes its key pairs and answers its public keys), `shares` (the coordinator relays the roster;
each unit answers Shamir shares of its mask key, sealed to each other unit), then every round
`masked` (round 1's global model carries the relayed shares; each unit sends n · update plus
pairwise masks derived from the pairwise secrets and the round id, so the coordinator learns only
the sum) and, only when a unit dropped, `unmask` (the survivors return shares of the dropped
unit's mask key; the coordinator removes its masks and completes the round's sum; a recovered
unit takes no further part in the training). A unit's secrets stay in one 0600 file of its own
site (`_secure_turn`, the participant's code path, also for the coordinator's own units).
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import FederatedStage, load_config
from pipelines.fileio import atomic_path, read_json, update_json, write_json
from pipelines.learning import registry
from pipelines.steps import StepContext, StepError, step

GLOBAL, UPDATE = "federated-model", "federated-update"  # the content types of the two package kinds
_TRAINING_ID = re.compile(r"^[0-9a-f]{16}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
PHASES = ("keys", "shares", "masked", "unmask")  # secure aggregation's phases, in their order
SECAGG = "secagg.json"  # the content file of a secure-aggregation answer (named here, never by a package)


# ---------------------------------------------------------------------------- plan and names


def plan_of(stage: int) -> tuple[FederatedStage, str, str]:
    """The stage's federated plan, its coordinator site and its model (M3 ...)."""
    conf = load_config().stages
    entry = conf.stage(stage)
    try:
        plan = conf.federated_stage(stage)
    except KeyError as exc:
        raise StepError(str(exc)) from None
    return plan, entry.site, entry.model or ""


def kinds(model: str) -> tuple[str, str]:
    """The package kinds (inbox names, asset names) of a stage's global models and updates."""
    return f"{model.lower()}-fl-global", f"{model.lower()}-fl-update"


def unit_names(site: str, count: int) -> list[str]:
    return [f"{site}/unit-{i}" for i in range(count)]


def split_units(n_rows: int, count: int, seed: int) -> list[np.ndarray]:
    """The row indices of each of a site's `count` units: a seeded permutation dealt round-robin, so
    every unit has its own rows, all rows are used once, and the split is the same every round."""
    order = np.random.default_rng(seed).permutation(n_rows)
    parts = [np.sort(order[i::count]) for i in range(count)]
    if any(len(p) == 0 for p in parts):
        raise StepError(f"{n_rows} rows cannot be split into {count} units with rows of their own")
    return parts


def _flag(value: Any, name: str) -> bool:
    """A boolean parameter, also as a rendered DAG param ("True" / "False")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise StepError(f"{name} must be true or false, not {str(value)[:40]!r}")


def vector_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _state_path(ctx: StepContext, name: str) -> Path:
    folder = ctx.paths.state_dir / "federated"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _base(ctx: StepContext, plan: FederatedStage) -> registry.ModelRef:
    try:
        return registry.resolve_model(ctx.paths, plan.base_model)
    except Exception as exc:  # noqa: BLE001 - any lookup failure: the site lacks the base model
        raise StepError(f"{ctx.site} holds no {plan.base_model} to train from: {exc}") from None


def _model_parts(ref: registry.ModelRef):
    """(state_dict, architecture, spec) of a registered model."""
    from pipelines.learning import families
    from pipelines.learning.artifacts import load_weights

    meta = ref.metadata
    return load_weights(ref.model_dir), families.metadata_architecture(meta), families.metadata_spec(meta)


def _unit_rows(ctx: StepContext, plan: FederatedStage, spec, site_seed: int):
    """The site's units: (name, x, y) each, and the dataset version they share."""
    from pipelines.steps.training import _load, _xy

    frame, version = _load(ctx, plan.data[ctx.site], action="train", purpose="training")
    x, y = _xy(frame, spec, f"{version.id}")
    parts = split_units(len(x), plan.units[ctx.site], site_seed)
    return [(name, x[idx], y[idx]) for name, idx in zip(unit_names(ctx.site, len(parts)), parts, strict=True)], version


def _local_config(plan: FederatedStage):
    from pipelines.federated import LocalConfig

    return LocalConfig(epochs=plan.local.epochs, lr=plan.local.lr, batch_size=plan.local.batch_size, mu=plan.mu,
                       optimizer=plan.local.optimizer, weight_decay=plan.local.weight_decay)


def _train_units(ctx: StepContext, plan: FederatedStage, state, architecture, spec, *, training: str,
                 number: int) -> tuple[list[dict[str, Any]], list[np.ndarray], Any]:
    """Train each of this site's units from `state`: their records, update vectors and dataset version.
    Seeded by the stage seed, the round and the unit (as centralized training is by the stage seed)."""
    from pipelines.federated import clip_update, local_update
    from pipelines.federated.rounds import _unit_seed

    seed = load_config().stages.seed
    units, version = _unit_rows(ctx, plan, spec, seed)
    records, vectors = [], []
    for name, x, y in units:
        update = local_update(state, x, y, architecture=architecture, spec=spec, config=_local_config(plan),
                              seed=_unit_seed(seed, number, name), who=name)
        delta = update.delta
        if plan.privacy is not None:
            delta, _ = clip_update(delta, plan.privacy.clip_norm)
        vectors.append(delta)
        records.append({"unit": name, "n_samples": update.n_samples, **update.metrics})
    return records, vectors, version


def round_epsilon(plan: FederatedStage, rounds: int) -> dict[str, float] | None:
    """The (epsilon, delta) the coordinator's noise grants each unit after `rounds` rounds (None without privacy)."""
    if plan.privacy is None:
        return None
    from pipelines.federated import epsilon

    value = epsilon([plan.privacy.noise_multiplier] * rounds, sample_rate=1.0, delta=plan.privacy.delta)
    return {"epsilon": float(value), "delta": float(plan.privacy.delta)}


def _gate_document(ctx: StepContext, *, model_id: str, stage: str, lineage: list[dict[str, Any]],
                   recipient: str, what: str) -> dict[str, Any]:
    """The model_release gate input for a global model or an update (purpose collaboration): no
    signature or watermark of a model directory (the package is signed), the lineage it derives from."""
    from pipelines.steps.exchange import _requester

    return {"model": {"id": model_id, "site": ctx.site, "stage": stage, "metrics": {},
                      "watermark": {"verified": False, "reason": f"{what}: not a model directory"},
                      "signature": {"verified": False}, "lineage": lineage, "restrictions": {}, "revoked": None},
            "recipient": recipient, "purpose": "collaboration", "requested_by": _requester(ctx), "approvals": []}


def _seal(ctx: StepContext, recipient: str, src: Path, *, content_type: str, metadata: dict[str, Any],
          document: dict[str, Any]) -> dict[str, Any]:
    from pipelines.steps.exchange import _gate, _seal_to_outbox

    _gate(ctx, "model_release", document)
    header, target = _seal_to_outbox(ctx, recipient, src, purpose="collaboration", content_type=content_type,
                                     metadata=metadata)
    return {"package": str(target), "package_id": header["package_id"], "bytes": target.stat().st_size,
            "content_type": content_type}


# ---------------------------------------------------------------------------- secure aggregation: a unit's turn


def _unit_file(ctx: StepContext, training: str, index: int) -> Path:
    """The private state of this site's unit `index` in `training` (a checked training id): its own
    0600 file under the site's state dir, read by `_secure_turn` only."""
    if not _TRAINING_ID.fullmatch(training):
        raise StepError(f"training id {training[:40]!r} is malformed")
    folder = _state_path(ctx, "secagg")
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{training}-unit-{index}.json"


def _secure_turn(ctx: StepContext, plan: FederatedStage, *, training: str, number: int, secure: dict[str, Any],
                 vectors: list[np.ndarray | None] | None = None, weights: list[float] | None = None) -> dict[str, Any]:
    """This site's units' answer to one secure-aggregation phase: public keys (`keys`), shares sealed
    to each other unit (`shares`), masked vectors (`masked`: `vectors[i]` None for a unit that sends
    nothing) or the shares of the dropped units' mask keys (`unmask`). The units' secrets are kept
    and loaded here only, one file each, written atomically with mode 0600; the answer holds none."""
    from pipelines.federated.secure import PublicKeys, SecAggError, SecAggParticipant, SecAggSetup

    names = unit_names(ctx.site, plan.units[ctx.site])
    phase, round_id = secure["phase"], f"{training}/round-{number}"

    def load(i: int) -> tuple[dict[str, Any], SecAggParticipant]:
        path = _unit_file(ctx, training, i)
        if not path.exists():
            raise StepError(f"{names[i]} holds no secure-aggregation keys for training {training}")
        saved = read_json(path)
        return saved, SecAggParticipant.from_private_state(saved["party"])

    def save(i: int, saved: dict[str, Any], party: SecAggParticipant) -> None:
        write_json(_unit_file(ctx, training, i), {**saved, "party": party.private_state()}, mode=0o600)

    try:
        if phase == "keys":
            setup = SecAggSetup.from_dict(secure["setup"])
            keys = {}
            for i, name in enumerate(names):
                party = SecAggParticipant(name, setup)
                save(i, {"revealed": [], "unmasked": []}, party)
                keys[name] = party.public_keys().to_dict()
            return {"keys": keys}
        if phase == "shares":
            roster = {n: PublicKeys.from_dict(k) for n, k in secure["roster"].items()}
            out = {}
            for i, name in enumerate(names):
                saved, party = load(i)
                out[name] = {r: m.hex() for r, m in party.share_keys(roster).items()}
                save(i, saved, party)
            return {"shares": out}
        if phase == "masked":
            relay, excluded, masked = secure.get("relay") or {}, set(secure.get("excluded") or []), {}
            for i, name in enumerate(names):
                saved, party = load(i)
                if name in relay:
                    party.receive_shares({s: bytes.fromhex(m) for s, m in relay[name].items()})
                    save(i, saved, party)
                if vectors[i] is None or name in excluded:
                    continue
                if name in saved["revealed"]:
                    raise StepError(f"{name}'s mask key was revealed to the coordinator; it sends no more updates")
                vector = np.asarray(vectors[i], dtype=np.float64) * weights[i]
                masked[name] = party.for_round(round_id).masked_input(vector, self_mask=False)
            return {"masked": masked}
        if phase == "unmask":
            survivors, dropped, answers = secure["survivors"], secure["dropped"], {}
            for i, name in enumerate(names):
                if name not in survivors:
                    continue
                saved, party = load(i)
                if number in saved["unmasked"]:
                    raise StepError(f"{name} has answered the unmasking of round {number} already")
                got = party.for_round(round_id).unmask(survivors, dropped, self_mask=False)
                answers[name] = {"mask_key": {v: [x, str(y)] for v, (x, y) in got["mask_key"].items()}}
                saved = {**saved, "unmasked": [*saved["unmasked"], number],
                         "revealed": sorted(set(saved["revealed"]) | set(dropped))}
                save(i, saved, party)
            return {"answers": answers}
    except (SecAggError, KeyError, TypeError, ValueError) as exc:
        raise StepError(f"secure aggregation, phase {phase} of round {number}: {exc}") from None
    raise StepError(f"secure aggregation has no phase {str(phase)[:20]!r}")


def _secure_setup(plan: FederatedStage, training: str, size: int) -> dict[str, Any]:
    from pipelines.federated.secure import SecAggSetup

    units = [u for site in sorted(plan.units) for u in unit_names(site, plan.units[site])]
    return SecAggSetup(training, tuple(units), size).to_dict()


def _check_secure_global(plan: FederatedStage, site: str, training: str, size: int, secure: Any) -> str | None:
    """Why the `secure` part of a global model's metadata is not what this participant expects (None if it is)."""
    if not plan.secure_aggregation:
        return "carries secure-aggregation data; this stage aggregates in the clear" if secure else None
    if not isinstance(secure, dict) or secure.get("phase") not in PHASES:
        return "secure aggregation is on; the package names no phase of it"
    expected = _secure_setup(plan, training, size)
    units, mine = expected["participants"], unit_names(site, plan.units[site])
    phase = secure["phase"]
    if phase == "keys" and secure.get("setup") != expected:
        return f"its secure-aggregation setup is not this stage's ({len(units)} units, {size} values, training {training})"
    if phase == "shares" and (not isinstance(secure.get("roster"), dict) or sorted(secure["roster"]) != units):
        return f"its roster must name the units {units}"
    if phase == "masked":
        relay, excluded = secure.get("relay") or {}, secure.get("excluded") or []
        if not isinstance(relay, dict) or not set(relay) <= set(mine) or not isinstance(excluded, list) \
                or not set(excluded) <= set(units):
            return "its relayed shares or excluded units name units that are not this stage's"
        for name, messages in relay.items():
            if not isinstance(messages, dict) or set(messages) != set(units) - {name} \
                    or not all(isinstance(m, str) and len(m) < 4096 for m in messages.values()):
                return f"the shares relayed to {name} are not one message from each other unit"
    if phase == "unmask":
        survivors, dropped = secure.get("survivors"), secure.get("dropped")
        if not isinstance(survivors, list) or not isinstance(dropped, list) \
                or sorted(survivors + dropped) != units or not set(survivors) & set(mine):
            return "its survivors and dropped units must split this stage's units and name a unit of this site"
    return None


# ---------------------------------------------------------------------------- coordinator


def _training(ctx: StepContext, stage: int) -> dict[str, Any] | None:
    path = _state_path(ctx, f"stage-{stage}.json")
    return read_json(path) if path.exists() else None


def _save_training(ctx: StepContext, stage: int, record: dict[str, Any]) -> None:
    write_json(_state_path(ctx, f"stage-{stage}.json"), record)


def _vector_file(ctx: StepContext, training: str, name: str) -> Path:
    folder = _state_path(ctx, training)
    folder.mkdir(exist_ok=True)
    return folder / name


def _secure_meta(record: dict[str, Any], plan: FederatedStage, site: str, phase: str) -> dict[str, Any]:
    """The secure-aggregation part of a global model's metadata for `site` in `phase`."""
    secure = record["secure"]
    if phase == "keys":
        return {"phase": phase, "setup": secure["setup"]}
    if phase == "shares":
        return {"phase": phase, "roster": secure["roster"]}
    if phase == "unmask":
        return {"phase": phase, "survivors": record["current"]["survivors"], "dropped": record["current"]["dropped"]}
    mine = unit_names(site, plan.units[site])
    return {"phase": phase, "excluded": sorted(secure["recovered"]),
            **({"relay": {u: m for u, m in secure["relay"].items() if u in mine}} if secure.get("relay") else {})}


def _send_round(ctx: StepContext, plan: FederatedStage, record: dict[str, Any], state, architecture, spec,
                phase: str = "masked") -> None:
    """Seal the global model of the record's current round to every participant site; train the
    coordinator's own units (with secure aggregation: the phase's message, and the own units' answer
    through `_secure_turn` as at any participant)."""
    from pipelines.federated import StateLayout, update_bytes

    number, training = record["round"], record["training"]
    secure = plan.secure_aggregation
    data = update_bytes(StateLayout.of(state).to_vector(state))
    global_file = _vector_file(ctx, training, "global.bin")
    with atomic_path(global_file) as tmp:
        tmp.write_bytes(data)
    digest = vector_digest(data)
    kind_global, _ = kinds(record["model"])
    sent = {}
    for site in sorted(plan.units):
        if site == ctx.site:
            continue
        metadata = {"kind": kind_global, "training": training, "round": number, "stage": record["model"],
                    "digest": digest, "base_model": record["base_model"], "units": plan.units[site],
                    "deadline": record["deadline"], **({"secure": _secure_meta(record, plan, site, phase)}
                                                       if secure else {})}
        document = _gate_document(ctx, model_id=f"federated:{training}/round-{number}", stage=record["model"],
                                  lineage=record["lineage"], recipient=site, what="a global model")
        sent[site] = _seal(ctx, site, global_file, content_type=GLOBAL, metadata=metadata, document=document)
        print(f"round {number}: global model ({len(data)} bytes{', ' + phase if secure else ''}) sealed for "
              f"{site}: {sent[site]['bytes']} bytes")
    if phase != "masked":  # a setup phase: the own units answer like any participant's, nothing trains
        for site, got in sent.items():
            record["pending_bytes"]["down"][site] = record["pending_bytes"]["down"].get(site, 0) + got["bytes"]
        own_answer = _secure_turn(ctx, plan, training=training, number=number,
                                  secure=_secure_meta(record, plan, ctx.site, phase))
        record["current"] = {"round": number, "digest": digest, "started": time.time(), "sent": sent,
                             "phase": phase, "answers": {ctx.site: own_answer[phase]}, "received": {}}
        return
    records, vectors, version = _train_units(ctx, plan, state, architecture, spec, training=training, number=number)
    if secure:  # only the masked vectors of the own units are written (and seen) here
        weights = [1.0 if plan.privacy is not None else float(u["n_samples"]) for u in records]
        masked = _secure_turn(ctx, plan, training=training, number=number, vectors=vectors, weights=weights,
                              secure=_secure_meta(record, plan, ctx.site, "masked"))["masked"]
        vectors = [masked.get(u["unit"]) for u in records]  # none for an own unit excluded (its key recovered)
    own = []
    for unit, vector in zip(records, vectors, strict=True):
        if vector is None:
            continue
        path = _vector_file(ctx, training, f"own-{len(own)}.bin")
        with atomic_path(path) as tmp:
            tmp.write_bytes(update_bytes(vector))
        own.append({**unit, "file": path.name, "site": ctx.site})
    record["current"] = {"round": number, "digest": digest, "started": time.time(), "sent": sent, "own": own,
                         "received": {}, "own_dataset": _dataset_entry(ctx, version), "phase": "masked"}


def _dataset_entry(ctx: StepContext, version) -> dict[str, Any]:
    from pipelines.data.lineage import lineage_entries

    return {"datasets": [{"id": version.id, "md5": version.md5, "owner": version.owner}],
            "lineage": lineage_entries(ctx.paths, [version.id])}


def _start(ctx: StepContext, stage: int, plan: FederatedStage, model: str) -> dict[str, Any]:
    from pipelines.steps.training import _mlflow_run

    base = _base(ctx, plan)
    state, architecture, spec = _model_parts(base)
    training = uuid.uuid4().hex[:16]
    with _mlflow_run(ctx, run_name=f"federated-{model}-{training}") as run:
        import mlflow

        mlflow.log_params({"federated_training": training, "stage": model, "rule": plan.rule, "rounds": plan.rounds,
                           "min_rounds": plan.min_rounds, "tol": plan.tol or "", "units": sum(plan.units.values()),
                           "local_epochs": plan.local.epochs, "local_lr": plan.local.lr,
                           "deadline_seconds": plan.deadline_seconds,
                           "dp_clip_norm": plan.privacy.clip_norm if plan.privacy else "",
                           "dp_noise_multiplier": plan.privacy.noise_multiplier if plan.privacy else "",
                           "secure_aggregation": plan.secure_aggregation})
        mlflow.set_tags({"factory.federated": "true", "factory.stage": model, "factory.site": ctx.site})
    record = {"training": training, "stage": stage, "model": model, "status": "running", "round": 1,
              "base_model": {"name": base.name, "version": base.version, "run_key": base.metadata["run_key"]},
              "lineage": list(base.metadata.get("lineage", [])), "mlflow_run_id": run.info.run_id,
              "deadline": plan.deadline_seconds, "history": [], "dag_id": ctx.dag_id, "started_by_run": ctx.run_id,
              "pending_bytes": {"down": {}, "up": {}}}
    if plan.secure_aggregation:
        from pipelines.federated import StateLayout

        record["secure"] = {"setup": _secure_setup(plan, training, StateLayout.of(state).size), "roster": {},
                            "relay": {}, "recovered": {}}
    _send_round(ctx, plan, record, state, architecture, spec, "keys" if plan.secure_aggregation else "masked")
    _save_training(ctx, stage, record)
    return {"status": "started", "training": training, "round": 1, "finished": False}


def _accept_update(ctx: StepContext, plan: FederatedStage, record: dict[str, Any], size: int):
    """The check of an update package against the running round (PackageRejected otherwise)."""
    from pipelines.federated import FederatedError, update_from_bytes
    from pipelines.trust.packages import PackageRejected

    current = record["current"]

    def accept(header: dict[str, Any], content: Path) -> dict[str, Any]:
        sender, meta = header["sender"], header.get("metadata") or {}
        if sender == ctx.site or sender not in plan.units:
            raise PackageRejected(f"update from {sender}: not a participant of federated stage {record['stage']}")
        if header.get("content_type") != UPDATE:
            raise PackageRejected(f"update from {sender}: content type {str(header.get('content_type'))[:40]!r}")
        if meta.get("training") != record["training"]:
            raise PackageRejected(f"update from {sender}: training {str(meta.get('training'))[:40]!r} is not "
                                  f"the running one ({record['training']})")
        if meta.get("round") != current["round"]:
            raise PackageRejected(f"update from {sender}: round {str(meta.get('round'))[:20]} is not the "
                                  f"running round {current['round']}")
        if meta.get("digest") != current["digest"]:
            raise PackageRejected(f"update from {sender}: trained from another global model than round "
                                  f"{current['round']}'s")
        phase = current.get("phase", "masked")
        if sender in (current["received"] if phase == "masked" else current["answers"]):
            raise PackageRejected(f"update from {sender}: round {current['round']} already has its update"
                                  + (f" (phase {phase})" if plan.secure_aggregation else ""))
        if time.time() > current["started"] + record["deadline"]:
            raise PackageRejected(f"update from {sender}: past round {current['round']}'s deadline of "
                                  f"{record['deadline']:g} s; left out of the round")
        secure = meta.get("secure") if isinstance(meta.get("secure"), dict) else None
        if not plan.secure_aggregation and meta.get("secure") is not None:
            raise PackageRejected(f"update from {sender}: secure-aggregation data; this stage aggregates in the clear")
        if plan.secure_aggregation and (secure or {}).get("phase") != phase:
            raise PackageRejected(f"update from {sender}: phase {str((secure or {}).get('phase'))[:20]!r}; round "
                                  f"{current['round']} is in secure-aggregation phase {phase}")
        if phase != "masked":
            return {"phase": phase, "answer": _check_secure_answer(record, plan, sender, phase, content)}
        expected = unit_names(sender, plan.units[sender])
        units = meta.get("units")
        if plan.secure_aggregation:  # the units that sent a masked vector, by their index (a dropout sends none)
            excluded = set(record["secure"]["recovered"])
            indices = [u.get("index") if isinstance(u, dict) else None for u in units] if isinstance(units, list) else None
            if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(expected)
                                      for i in indices) or indices != sorted(set(indices)) \
                    or [u.get("unit") for u in units] != [expected[i] for i in indices] \
                    or excluded & {expected[i] for i in indices}:
                raise PackageRejected(f"update from {sender}: units must be some of {expected} by their index, "
                                      f"none of the excluded {sorted(excluded)}")
        else:
            if not isinstance(units, list) or [u.get("unit") if isinstance(u, dict) else None for u in units] != expected:
                raise PackageRejected(f"update from {sender}: units must be {expected}")
            indices = list(range(len(units)))
        if not content.is_dir():
            raise PackageRejected(f"update from {sender}: not a folder of unit updates")
        vectors = []
        for i, unit in zip(indices, units, strict=True):
            n = unit.get("n_samples")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise PackageRejected(f"update from {sender}: {expected[i]} claims {str(n)[:20]} rows")
            path = content / f"unit-{i}.bin"  # named here, never by the package
            try:
                data = path.read_bytes()
                if vector_digest(data) != unit.get("digest"):
                    raise FederatedError(f"{expected[i]}'s update does not match its digest")
                vector = update_from_bytes(data, size)
            except (OSError, FederatedError) as exc:
                raise PackageRejected(f"update from {sender}: {exc}") from None
            if vector.dtype != (np.uint64 if plan.secure_aggregation else np.float32):
                raise PackageRejected(f"update from {sender}: {expected[i]}'s update is "
                                      f"{'not masked' if plan.secure_aggregation else 'not float weights'}")
            vectors.append(vector)
        return {"units": [{"unit": expected[i], "n_samples": u["n_samples"], "site": sender}
                          for i, u in zip(indices, units, strict=True)],
                "vectors": vectors, "datasets": meta.get("datasets") or [], "lineage": meta.get("lineage") or []}

    return accept


def _check_secure_answer(record: dict[str, Any], plan: FederatedStage, sender: str, phase: str,
                         content: Path) -> dict[str, Any]:
    """A site's answer to a keys, shares or unmask phase, checked against the setup (PackageRejected otherwise)."""
    import json

    from pipelines.federated.secure import PRIME, PublicKeys, SecAggError
    from pipelines.trust.packages import PackageRejected

    path = content / SECAGG  # named here, never by the package
    try:
        answer = json.loads(path.read_text()) if content.is_dir() and path.is_file() else None
    except (OSError, ValueError):
        answer = None
    if not isinstance(answer, dict):
        raise PackageRejected(f"update from {sender}: no secure-aggregation answer")
    mine, units = unit_names(sender, plan.units[sender]), record["secure"]["setup"]["participants"]
    body = answer.get({"keys": "keys", "shares": "shares", "unmask": "answers"}[phase])
    bad = PackageRejected(f"update from {sender}: its {phase} answer must come from the units {mine} "
                          f"and hold what the phase asks for")
    if not isinstance(body, dict):
        raise bad
    try:
        if phase == "keys":
            if sorted(body) != mine:
                raise bad
            for keys in body.values():
                PublicKeys.from_dict(keys)
        elif phase == "shares":
            if sorted(body) != mine:
                raise bad
            for unit, messages in body.items():
                if not isinstance(messages, dict) or set(messages) != set(units) - {unit} \
                        or not all(isinstance(m, str) and len(m) < 4096 and bytes.fromhex(m) for m in messages.values()):
                    raise bad
        else:
            current = record["current"]
            if not body or not set(body) <= set(mine) & set(current["survivors"]):
                raise bad
            for unit, got in body.items():
                keys = got.get("mask_key") if isinstance(got, dict) else None
                x = units.index(unit) + 1
                if not isinstance(keys, dict) or set(keys) != set(current["dropped"]) or not all(
                        isinstance(v, list) and len(v) == 2 and v[0] == x and isinstance(v[1], str)
                        and v[1].isdigit() and int(v[1]) < PRIME for v in keys.values()):
                    raise bad
    except (SecAggError, ValueError, TypeError, AttributeError):
        raise bad from None
    return body


def _collect(ctx: StepContext, plan: FederatedStage, record: dict[str, Any], size: int) -> None:
    """Open every pending update package of the running round into the record (vectors to files)."""
    from pipelines.federated import update_bytes
    from pipelines.steps.exchange import _intake, _remember

    _, kind_update = kinds(record["model"])
    accept = _accept_update(ctx, plan, record, size)
    current = record["current"]
    while (opened := _intake(ctx, kind_update, accept)) is not None:
        header, placed = opened
        sender = header["sender"]
        package = Path(header["package"])
        size_up = package.stat().st_size if package.exists() else int(header["content_size"])
        _remember(ctx, "received", header["package_id"], {"package": str(package), "package_id": header["package_id"],
                                                          "kind": kind_update, "from": sender,
                                                          "training": record["training"], "round": current["round"]})
        if placed.get("phase") is not None:  # a secure-aggregation answer: keys, sealed shares, unmask shares
            current["answers"][sender] = placed["answer"]
            pending = record["pending_bytes"]["up"]
            pending[sender] = pending.get(sender, 0) + size_up
            print(f"round {current['round']}: {placed['phase']} answer from {sender}")
            continue
        files = []
        for i, vector in enumerate(placed["vectors"]):
            path = _vector_file(ctx, record["training"], f"{sender}-{current['round']}-{i}.bin")
            with atomic_path(path) as tmp:
                tmp.write_bytes(update_bytes(vector))
            files.append(path.name)
        current["received"][sender] = {
            "units": placed["units"], "files": files, "package_id": header["package_id"],
            "bytes": size_up, "content_type": header["content_type"], "datasets": placed["datasets"],
            "lineage": placed["lineage"], "at": time.time()}
        print(f"round {current['round']}: update of {len(files)} unit(s) from {sender}")


def _send_unmask(ctx: StepContext, plan: FederatedStage, record: dict[str, Any]) -> None:
    """Ask the sites with surviving units for their shares of the dropped units' mask keys (the round's
    global model again, with the survivors and the dropped); the own surviving units answer here."""
    current, training = record["current"], record["training"]
    global_file = _vector_file(ctx, training, "global.bin")
    kind_global, _ = kinds(record["model"])
    current.update(phase="unmask", started=time.time(), answers={})
    for site in sorted(plan.units):
        if not set(unit_names(site, plan.units[site])) & set(current["survivors"]):
            continue
        if site == ctx.site:
            current["answers"][site] = _secure_turn(ctx, plan, training=training, number=current["round"],
                                                    secure=_secure_meta(record, plan, site, "unmask"))["answers"]
            continue
        metadata = {"kind": kind_global, "training": training, "round": current["round"], "stage": record["model"],
                    "digest": current["digest"], "base_model": record["base_model"], "units": plan.units[site],
                    "deadline": record["deadline"], "secure": _secure_meta(record, plan, site, "unmask")}
        document = _gate_document(ctx, model_id=f"federated:{training}/round-{current['round']}", stage=record["model"],
                                  lineage=record["lineage"], recipient=site, what="a global model")
        sent = _seal(ctx, site, global_file, content_type=GLOBAL, metadata=metadata, document=document)
        down = record["pending_bytes"]["down"]
        down[site] = down.get(site, 0) + sent["bytes"]
        print(f"round {current['round']}: {site} asked for its shares of {current['dropped']}'s mask keys")


def _secure_aggregate(ctx: StepContext, plan: FederatedStage, record: dict[str, Any], state, layout):
    """The round's sum from the units' masked vectors (and the survivors' shares of a dropped unit's mask
    key): (state, units, reason the round was left out or None, units whose masks were recovered)."""
    from pipelines.federated import apply_update, update_from_bytes
    from pipelines.federated.privacy import gaussian_noise
    from pipelines.federated.secure import PublicKeys, SecAggCoordinator, SecAggError, SecAggSetup

    current, secure = record["current"], record["secure"]
    setup = SecAggSetup.from_dict({**secure["setup"], "round_id": f"{record['training']}/round-{current['round']}"})
    coordinator = SecAggCoordinator(setup, roster={n: PublicKeys.from_dict(k) for n, k in secure["roster"].items()})
    names, weights = [], []
    for unit in current["own"]:
        coordinator.add_masked(unit["unit"], update_from_bytes(
            _vector_file(ctx, record["training"], unit["file"]).read_bytes(), layout.size))
        names.append(unit["unit"])
        weights.append(float(unit["n_samples"]))
    for sender in sorted(current["received"]):
        got = current["received"][sender]
        for unit, name in zip(got["units"], got["files"], strict=True):
            coordinator.add_masked(unit["unit"], update_from_bytes(
                _vector_file(ctx, record["training"], name).read_bytes(), layout.size))
            names.append(unit["unit"])
            weights.append(float(unit["n_samples"]))
    answers = {unit: {"mask_key": {v: (x, int(y)) for v, (x, y) in got["mask_key"].items()}}
               for body in current.get("answers", {}).values() for unit, got in body.items()}
    try:
        total = coordinator.unmasked_sum(answers, self_mask=False,
                                         known_keys={u: bytes.fromhex(k) for u, k in secure["recovered"].items()})
    except SecAggError as exc:
        return state, names, f"secure aggregation: {exc}; the round is left out", []
    recovered = sorted(coordinator.recovered)
    secure["recovered"].update({u: k.hex() for u, k in coordinator.recovered.items()})
    if plan.privacy is not None:  # DP-FedAvg: the sum of clipped updates, equal weights, central noise
        rng = np.random.default_rng([load_config().stages.seed, current["round"]])
        total += gaussian_noise(len(total), plan.privacy.noise_multiplier * plan.privacy.clip_norm, rng)
        return apply_update(state, (total / len(names)).astype(np.float32)), names, None, recovered
    return apply_update(state, (total / sum(weights)).astype(np.float32)), names, None, recovered


def _aggregate_round(ctx: StepContext, plan: FederatedStage, record: dict[str, Any], state, layout):
    from pipelines.federated import AggregationError, aggregate, apply_update, update_from_bytes
    from pipelines.federated.privacy import gaussian_noise

    current = record["current"]
    names, vectors, weights = [], [], []
    for unit in current["own"]:
        names.append(unit["unit"])
        vectors.append(update_from_bytes(_vector_file(ctx, record["training"], unit["file"]).read_bytes(), layout.size))
        weights.append(float(unit["n_samples"]))
    for sender in sorted(current["received"]):
        got = current["received"][sender]
        for unit, name in zip(got["units"], got["files"], strict=True):
            names.append(unit["unit"])
            vectors.append(update_from_bytes(_vector_file(ctx, record["training"], name).read_bytes(), layout.size))
            weights.append(float(unit["n_samples"]))
    if plan.privacy is not None:  # DP-FedAvg: clipped updates (clipped by each unit), equal weights, central noise
        summed = np.sum([v.astype(np.float64) for v in vectors], axis=0)
        rng = np.random.default_rng([load_config().stages.seed, current["round"]])
        summed += gaussian_noise(len(summed), plan.privacy.noise_multiplier * plan.privacy.clip_norm, rng)
        return apply_update(state, (summed / len(vectors)).astype(np.float32)), names, None
    try:
        delta = aggregate(plan.rule, vectors, weights, f=plan.f, beta=plan.beta, m=plan.m)
    except AggregationError as exc:
        return state, names, str(exc)
    return apply_update(state, delta), names, None


def _evaluate(ctx: StepContext, state, architecture, spec, model: str) -> dict[str, float]:
    from pipelines.federated import evaluate_state
    from pipelines.steps.training import _load, _xy

    out = {}
    for key, ref in load_config().stages.inputs.model(model).test_sets.items():
        frame, version = _load(ctx, ref, action="read", purpose="evaluation")
        x, y = _xy(frame, spec, f"test set {version.id}")
        scores = evaluate_state(state, x, y, architecture=architecture, spec=spec)
        out[key], out[f"{key}_loss"] = round(scores["accuracy"], 6), scores["loss"]
    return out


def _finish_round(ctx: StepContext, plan: FederatedStage, record: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the running round, evaluate, log, then start the next round or stage the result."""
    from pipelines.federated import StateLayout, update_from_bytes
    from pipelines.steps.training import _mlflow_run

    base = _base(ctx, plan)
    template, architecture, spec = _model_parts(base)
    layout = StateLayout.of(template)
    current = record["current"]
    state = layout.to_state(update_from_bytes(_vector_file(ctx, record["training"], "global.bin").read_bytes(),
                                              layout.size), template)
    if plan.secure_aggregation:
        state, included, skipped, recovered = _secure_aggregate(ctx, plan, record, state, layout)
    else:
        (state, included, skipped), recovered = _aggregate_round(ctx, plan, record, state, layout), []
    stragglers = sorted(set(plan.units) - {ctx.site} - set(current["received"]))
    pending = record.get("pending_bytes") or {"down": {}, "up": {}}
    metrics = _evaluate(ctx, state, architecture, spec, record["model"])
    spent = round_epsilon(plan, current["round"])
    entry = {"round": current["round"], "included": included, "stragglers": stragglers, "skipped": skipped,
             "metrics": metrics, "seconds": time.time() - current["started"],
             "bytes_down": {s: v["bytes"] + pending["down"].get(s, 0) for s, v in current["sent"].items()},
             "bytes_up": {s: current["received"].get(s, {}).get("bytes", 0) + pending["up"].get(s, 0)
                          for s in current["sent"]},
             "secure_aggregation": plan.secure_aggregation, "recovered": recovered,
             "content_types": sorted({v["content_type"] for v in current["sent"].values()}
                                     | {v["content_type"] for v in current["received"].values()}),
             **({"dp": spent} if spent else {})}
    record["history"].append(entry)
    record["pending_bytes"] = {"down": {}, "up": {}}
    for got in [current["own_dataset"], *current["received"].values()]:  # every dataset that took part
        for dataset in got["datasets"]:
            if dataset not in record.setdefault("datasets", []):
                record["datasets"].append(dataset)
        for source in got["lineage"]:
            if source.get("dataset_id") not in {s.get("dataset_id") for s in record["lineage"]}:
                record["lineage"].append(source)
    with _mlflow_run(ctx, record["mlflow_run_id"]):
        import mlflow

        mlflow.log_metrics({**{k: v for k, v in metrics.items()}, "units_included": len(included),
                            "sites_left_out": len(stragglers),
                            "bytes_down": sum(entry["bytes_down"].values()), "bytes_up": sum(entry["bytes_up"].values()),
                            "secure_aggregation": float(plan.secure_aggregation), "units_recovered": len(recovered),
                            "round_left_out": float(skipped is not None),
                            **({"dp_epsilon": spent["epsilon"]} if spent else {})}, step=current["round"])
    print(f"round {current['round']}: {len(included)} units, left out {stragglers or 'none'}; {metrics}")
    key = next(iter(load_config().stages.inputs.model(record["model"]).test_sets))
    stop = None
    if current["round"] >= plan.rounds:
        stop = "rounds"
    elif plan.tol is not None and current["round"] >= plan.min_rounds and len(record["history"]) >= 2:
        if abs(metrics[key] - record["history"][-2]["metrics"][key]) < plan.tol:
            stop = "converged"
    if stop is None:
        record["round"] = current["round"] + 1
        _send_round(ctx, plan, record, state, architecture, spec)
        _save_training(ctx, record["stage"], record)
        return {"status": "next_round", "training": record["training"], "round": record["round"], "finished": False,
                "metrics": metrics}
    trained = _stage_model(ctx, plan, record, base, state, stop)
    record.update(status="finished", stopped=stop, current=None, trained=trained)
    _save_training(ctx, record["stage"], record)
    # the trained run's keys at the top level too: evaluate_model takes this result as its `trained`
    return {**trained, "status": "finished", "training": record["training"], "round": entry["round"],
            "finished": True, "stopped": stop, "round_metrics": metrics, "trained": trained}


def _stage_model(ctx: StepContext, plan: FederatedStage, record: dict[str, Any], base: registry.ModelRef, state,
                 stop: str) -> dict[str, Any]:
    """The final global model staged like train_model's output, for evaluate → export → register."""
    from pipelines.learning import families
    from pipelines.learning.artifacts import code_version, load_model, model_digest, save_weights
    from pipelines.learning.privacy import lineage_with_spend

    meta = base.metadata
    key = hashlib.sha256(f"federated:{record['training']}".encode()).hexdigest()[:16]
    staging = ctx.paths.state_dir / "staging" / key / "model"
    staging.mkdir(parents=True, exist_ok=True)
    model = load_model(base.model_dir)
    model.load_state_dict(state)
    save_weights(model, staging)
    spent = round_epsilon(plan, len(record["history"]))
    own = {d["dataset_id"] for d in meta.get("lineage", [])}
    lineage = lineage_with_spend(meta.get("lineage", []), [s for s in record["lineage"] if s["dataset_id"] not in own],
                                 spent)
    family = families.metadata_family(meta)
    write_json(staging / "metadata.json", {
        "name": registry.registered_name(record["model"], None, family=family), "stage": record["model"],
        "variant": None, "site": ctx.site, "run_key": key, "family": family,
        "architecture": families.metadata_architecture(meta), "spec": families.metadata_spec(meta).to_dict(),
        "input_envelope": meta.get("input_envelope"), "datasets": record.get("datasets", []),
        "base_model": {"name": base.name, "version": base.version, "digest": model_digest(base.model_dir)},
        "lineage": lineage, "metrics": {},
        "training": {"profile": "federated", "records": sum(u["n_samples"] for u in record["current"]["own"]),
                     "subset": None, "subset_datasets": None, "purpose": "training", "recipient": None},
        "federated": {"training": record["training"], "rule": plan.rule, "rounds": len(record["history"]),
                      "secure_aggregation": plan.secure_aggregation,
                      "recovered": sorted(record.get("secure", {}).get("recovered", {})),
                      "stopped": stop, "units": plan.units, "history": record["history"]},
        "reference_data": [d["id"] for d in record.get("datasets", []) if d.get("owner") == ctx.site],
        "code_version": code_version(), "mlflow_run_id": record["mlflow_run_id"], "dag_id": ctx.dag_id,
        "dag_run_id": ctx.run_id,
        **({"privacy": {"mechanism": "dp-fedavg", **spent, "noise_multiplier": plan.privacy.noise_multiplier,
                        "clip_norm": plan.privacy.clip_norm}} if spent else {}),
    })
    return {"run_key": key, "name": registry.registered_name(record["model"], None, family=family),
            "staging": str(staging), "mlflow_run_id": record["mlflow_run_id"], "stage": record["model"]}


@step("federated_coordinate")
def federated_coordinate(ctx: StepContext, *, stage: int, start: bool = False) -> dict[str, Any]:
    """The coordinator's turn: start a training (`start`), or collect the running round's updates
    and, once every participant site sent or the deadline passed, aggregate and go on (next round
    or finish). Returns `finished` and, when finished, `trained` for evaluate → export → register."""
    plan, coordinator, model = plan_of(stage)
    if ctx.site != coordinator:
        raise StepError(f"the coordinator of federated stage {stage} is {coordinator}, not {ctx.site}")
    start = _flag(start, "start")
    if load_config().stages.collaboration_of(stage) != "federated":
        if start:
            raise StepError(f"stage {stage} collaborates centralized (conf/stages.yaml collaboration); "
                            "set it to federated to start federated rounds")
        return {"status": "centralized", "finished": False}
    record = _training(ctx, stage)
    running = record is not None and record["status"] == "running"
    if start:
        if running:
            raise StepError(f"federated training {record['training']} of stage {stage} is still running "
                            f"(round {record['round']}); a new one starts when it finishes")
        return _start(ctx, stage, plan, model)
    if not running:
        return {"status": "idle", "finished": False}
    from pipelines.federated import StateLayout

    size = StateLayout.of(_model_parts(_base(ctx, plan))[0]).size
    _collect(ctx, plan, record, size)
    _save_training(ctx, stage, record)
    current = record["current"]
    phase = current.get("phase", "masked")
    expected = set(plan.units) - {ctx.site}
    if phase == "unmask":
        expected = {s for s in expected if set(unit_names(s, plan.units[s])) & set(current["survivors"])}
    missing = sorted(expected - set(current["received"] if phase == "masked" else current["answers"]))
    if missing and time.time() <= current["started"] + record["deadline"]:
        print(f"round {current['round']}: waiting for {', '.join(missing)}" + (f" ({phase})" if phase != "masked" else ""))
        return {"status": "waiting", "training": record["training"], "round": current["round"], "waiting": missing,
                "finished": False, **({"phase": phase} if plan.secure_aggregation else {})}
    if phase in ("keys", "shares"):
        return _next_setup_phase(ctx, plan, record, missing)
    if phase == "masked" and plan.secure_aggregation:
        sent = {u["unit"] for u in current["own"]} | {u["unit"] for got in current["received"].values()
                                                        for u in got["units"]}
        units = record["secure"]["setup"]["participants"]
        survivors, dropped = [u for u in units if u in sent], [u for u in units if u not in sent]
        if set(dropped) - set(record["secure"]["recovered"]) and len(survivors) >= record["secure"]["setup"]["threshold"]:
            current.update(survivors=survivors, dropped=dropped)
            _send_unmask(ctx, plan, record)
            _save_training(ctx, stage, record)
            return {"status": "unmasking", "training": record["training"], "round": current["round"],
                    "dropped": dropped, "finished": False, "phase": "unmask"}
    return _finish_round(ctx, plan, record)


def _next_setup_phase(ctx: StepContext, plan: FederatedStage, record: dict[str, Any], missing: list[str]) -> dict[str, Any]:
    """After `keys` every unit's public keys make the roster (sent for `shares`); after `shares` the
    sealed shares are regrouped by recipient and round 1's global model carries them (`masked`).
    Setup needs every unit: a site missing past the deadline fails the training."""
    current, secure = record["current"], record["secure"]
    if missing:
        record.update(status="failed", reason=f"secure-aggregation setup ({current['phase']}): no answer from "
                                              f"{', '.join(missing)} by the deadline; setup needs every unit")
        _save_training(ctx, record["stage"], record)
        raise StepError(f"federated training {record['training']}: {record['reason']}")
    answers = current["answers"]
    if current["phase"] == "keys":
        secure["roster"] = {u: k for body in answers.values() for u, k in body.items()}
        phase = "shares"
    else:
        relay: dict[str, dict[str, str]] = {}
        for body in answers.values():
            for sender, messages in body.items():
                for recipient, message in messages.items():
                    relay.setdefault(recipient, {})[sender] = message
        secure["relay"], phase = relay, "masked"
    from pipelines.federated import StateLayout, update_from_bytes

    template, architecture, spec = _model_parts(_base(ctx, plan))
    layout = StateLayout.of(template)
    state = layout.to_state(update_from_bytes(_vector_file(ctx, record["training"], "global.bin").read_bytes(),
                                              layout.size), template)
    _send_round(ctx, plan, record, state, architecture, spec, phase)
    if phase == "masked":
        secure["relay"] = {}  # delivered: the sites' units hold their shares now
    _save_training(ctx, record["stage"], record)
    return {"status": phase, "training": record["training"], "round": record["round"], "finished": False,
            "phase": phase}


# ---------------------------------------------------------------------------- participant


def _participant_state(ctx: StepContext, stage: int) -> Path:
    return _state_path(ctx, f"participant-stage-{stage}.json")


def _accept_global(ctx: StepContext, plan: FederatedStage, coordinator: str, model: str, base: registry.ModelRef,
                   size: int, answered: dict[str, Any]):
    from pipelines.federated import FederatedError, update_from_bytes
    from pipelines.trust.packages import PackageRejected

    def accept(header: dict[str, Any], content: Path) -> dict[str, Any]:
        sender, meta = header["sender"], header.get("metadata") or {}
        if sender != coordinator:
            raise PackageRejected(f"global model from {sender}: the coordinator of this stage is {coordinator}")
        if header.get("content_type") != GLOBAL:
            raise PackageRejected(f"global model from {sender}: content type {str(header.get('content_type'))[:40]!r}")
        training, number = meta.get("training"), meta.get("round")
        if not isinstance(training, str) or not _TRAINING_ID.fullmatch(training):
            raise PackageRejected(f"global model from {sender}: training id {str(training)[:40]!r} is malformed")
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise PackageRejected(f"global model from {sender}: round {str(number)[:20]!r} is not a round number")
        if meta.get("stage") != model:
            raise PackageRejected(f"global model from {sender}: stage {str(meta.get('stage'))[:20]!r}, expected {model}")
        secure = meta.get("secure")
        phase = secure.get("phase") if isinstance(secure, dict) else "masked"
        step_of = (number, PHASES.index(phase) if phase in PHASES else -1)
        last = answered.get(training, {})
        if step_of <= (last.get("last_round", 0), PHASES.index(last.get("last_phase", "masked"))):
            raise PackageRejected(f"global model from {sender}: round {number} of {training}"
                                  f"{' (' + str(phase) + ')' if plan.secure_aggregation else ''} was answered already")
        why = _check_secure_global(plan, ctx.site, training, size, secure)
        if why:
            raise PackageRejected(f"global model from {sender}: {why}")
        if meta.get("units") != plan.units.get(ctx.site):
            raise PackageRejected(f"global model from {sender}: asks for {str(meta.get('units'))[:20]} units; "
                                  f"{ctx.site} takes part with {plan.units.get(ctx.site)}")
        base_meta = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
        if base_meta.get("run_key") != base.metadata.get("run_key"):
            raise PackageRejected(f"global model from {sender}: derives from {str(base_meta.get('run_key'))[:40]!r}, "
                                  f"not the {plan.base_model} {ctx.site} verified ({base.metadata.get('run_key')})")
        if not content.is_file():
            raise PackageRejected(f"global model from {sender}: not a file")
        data = content.read_bytes()
        if vector_digest(data) != meta.get("digest") or not _DIGEST.fullmatch(str(meta.get("digest"))):
            raise PackageRejected(f"global model from {sender}: content does not match its digest")
        try:
            vector = update_from_bytes(data, size)
        except FederatedError as exc:
            raise PackageRejected(f"global model from {sender}: {exc}") from None
        if vector.dtype != np.float32:
            raise PackageRejected(f"global model from {sender}: not float weights")
        return {"training": training, "round": number, "digest": meta["digest"], "vector": vector,
                "deadline": meta.get("deadline"), "secure": secure if plan.secure_aggregation else None,
                "phase": phase}

    return accept


def _answer_phase(ctx: StepContext, plan: FederatedStage, *, model: str, coordinator: str, got: dict[str, Any],
                  header: dict[str, Any], state_file: Path) -> dict[str, Any]:
    """A participant's answer to a keys, shares or unmask message of secure aggregation (no training)."""
    training, number, phase = got["training"], got["round"], got["phase"]
    answer = _secure_turn(ctx, plan, training=training, number=number, secure=got["secure"])
    folder = _state_path(ctx, f"secagg-{training}-{number}-{phase}") / "update"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SECAGG, answer)
    from pipelines.data.lineage import lineage_entries
    from pipelines.steps.training import _load

    _, version = _load(ctx, plan.data[ctx.site], action="train", purpose="training")  # the data the units hold
    document = _gate_document(ctx, model_id=f"federated-update:{training}/round-{number}/{ctx.site}/{phase}",
                              stage=model, lineage=lineage_entries(ctx.paths, [version.id]), recipient=coordinator,
                              what=f"a secure-aggregation {phase} answer")
    metadata = {"kind": kinds(model)[1], "training": training, "round": number, "stage": model, "digest": got["digest"],
                "secure": {"phase": phase}}
    sent = _seal(ctx, coordinator, folder, content_type=UPDATE, metadata=metadata, document=document)
    bytes_in = Path(header["package"]).stat().st_size if Path(header["package"]).exists() else header["content_size"]
    with update_json(state_file, {}) as records:
        entry = records.setdefault(training, {"rounds": {}})
        entry["last_round"], entry["last_phase"] = number, phase
        entry.setdefault("secure", []).append({"round": number, "phase": phase, "bytes_in": bytes_in,
                                               "bytes_out": sent["bytes"]})
    print(f"round {number} of {training}: secure-aggregation {phase} answer sealed for {coordinator} "
          f"({sent['bytes']} bytes)")
    return {"status": "sent", "training": training, "round": number, "phase": phase, "package_id": sent["package_id"],
            "bytes_in": bytes_in, "bytes_out": sent["bytes"], "metrics": {}}


@step("federated_participate")
def federated_participate(ctx: StepContext, *, stage: int, withdraw: list[str] | None = None) -> dict[str, Any]:
    """A participant site's turn: open the newest global model of a federated stage, train each unit
    on its own share of the site's data, evaluate the global model on this site's test sets (its
    own MLflow), and seal the units' updates (vectors and row counts only) back to the coordinator
    through the model_release gate (the owner's decision: its dataset is the update's lineage).
    With secure aggregation the units' answers are those of the message's phase and the updates are
    masked; `withdraw` names units of this site that send nothing this round (a unit dropping out)."""
    from pipelines.federated import StateLayout, update_bytes
    from pipelines.federated import evaluate_state as score
    from pipelines.steps.exchange import _intake, _remember
    from pipelines.steps.training import _load, _mlflow_run, _xy

    plan, coordinator, model = plan_of(stage)
    if load_config().stages.collaboration_of(stage) != "federated":
        return {"status": "centralized", "stage": stage}
    if ctx.site == coordinator or ctx.site not in plan.units:
        raise StepError(f"{ctx.site} is not a participant of federated stage {stage} ({sorted(plan.units)})")
    withdraw = list(withdraw or [])
    if not set(withdraw) <= set(unit_names(ctx.site, plan.units[ctx.site])):
        raise StepError(f"withdraw names units that are not {ctx.site}'s: {withdraw}")
    base = _base(ctx, plan)
    template, architecture, spec = _model_parts(base)
    layout = StateLayout.of(template)
    state_file = _participant_state(ctx, stage)
    answered = read_json(state_file) if state_file.exists() else {}
    kind_global, kind_update = kinds(model)
    opened = _intake(ctx, kind_global, _accept_global(ctx, plan, coordinator, model, base, layout.size, answered))
    if opened is None:
        return {"status": "idle", "stage": stage}
    header, got = opened
    bytes_in = Path(header["package"]).stat().st_size if Path(header["package"]).exists() else header["content_size"]
    _remember(ctx, "received", header["package_id"], {"package": header["package"], "package_id": header["package_id"],
                                                      "kind": kind_global, "from": header["sender"],
                                                      "training": got["training"], "round": got["round"]})
    if got["phase"] != "masked":
        return _answer_phase(ctx, plan, model=model, coordinator=coordinator, got=got, header=header,
                             state_file=state_file)
    training, number = got["training"], got["round"]
    state = layout.to_state(got["vector"], template)
    metrics = {}  # the global model where this site's data lives
    for key, ref in load_config().stages.inputs.received_test_sets(ctx.site).items():
        frame, version = _load(ctx, ref, action="read", purpose="evaluation")
        x, y = _xy(frame, spec, f"test set {version.id}")
        scores = score(state, x, y, architecture=architecture, spec=spec)
        metrics[f"global_{key}"], metrics[f"global_{key}_loss"] = scores["accuracy"], scores["loss"]
    units, vectors, version = _train_units(ctx, plan, state, architecture, spec, training=training, number=number)
    from pipelines.data.lineage import lineage_entries

    spent = round_epsilon(plan, number)
    lineage = [{**entry, "dp": spent} for entry in lineage_entries(ctx.paths, [version.id])]
    folder = _state_path(ctx, f"update-{training}-{number}") / "update"
    folder.mkdir(parents=True, exist_ok=True)
    unit_meta = []
    if got["secure"] is not None:  # masked vectors only; a withdrawn unit sends nothing
        weights = [1.0 if plan.privacy is not None else float(u["n_samples"]) for u in units]
        masked = _secure_turn(ctx, plan, training=training, number=number, secure=got["secure"], weights=weights,
                              vectors=[None if u["unit"] in withdraw else v for u, v in zip(units, vectors, strict=True)])
        vectors = [masked["masked"].get(u["unit"]) for u in units]
    for i, (unit, vector) in enumerate(zip(units, vectors, strict=True)):
        if vector is None:
            continue
        data = update_bytes(vector)
        with atomic_path(folder / f"unit-{i}.bin") as tmp:
            tmp.write_bytes(data)
        unit_meta.append({"unit": unit["unit"], "n_samples": unit["n_samples"], "digest": vector_digest(data),
                          **({"index": i} if got["secure"] is not None else {})})
    document = _gate_document(ctx, model_id=f"federated-update:{training}/round-{number}/{ctx.site}", stage=model,
                              lineage=lineage, recipient=coordinator, what="a model update")
    metadata = {"kind": kind_update, "training": training, "round": number, "stage": model, "digest": got["digest"],
                "units": unit_meta, "datasets": [{"id": version.id, "md5": version.md5, "owner": version.owner}],
                "lineage": lineage, **({"secure": {"phase": "masked"}} if got["secure"] is not None else {})}
    sent = _seal(ctx, coordinator, folder, content_type=UPDATE, metadata=metadata, document=document)
    with update_json(state_file, {}) as records:
        entry = records.setdefault(training, {"rounds": {}})
        if "mlflow_run_id" not in entry:
            with _mlflow_run(ctx, run_name=f"federated-{model}-{training}-{ctx.site}") as run:
                import mlflow

                mlflow.set_tags({"factory.federated": "true", "factory.stage": model, "factory.site": ctx.site,
                                 "factory.federated_training": training})
            entry["mlflow_run_id"] = run.info.run_id
        entry["last_round"], entry["last_phase"] = number, "masked"
        entry["rounds"][str(number)] = {"bytes_in": bytes_in, "bytes_out": sent["bytes"], "metrics": metrics,
                                        "units": units, "content_types": [GLOBAL, UPDATE]}
        run_id = entry["mlflow_run_id"]
    with _mlflow_run(ctx, run_id):
        import mlflow

        unit_metrics = {f"{u['unit'].split('/')[-1]}_{k}": v for u in units for k, v in u.items()
                        if k in ("train_loss", "train_accuracy")}
        mlflow.log_metrics({**metrics, **unit_metrics, "bytes_in": bytes_in, "bytes_out": sent["bytes"]}, step=number)
    print(f"round {number} of {training}: {len(units)} unit update(s) sealed for {coordinator} "
          f"({sent['bytes']} bytes); global model here: {metrics}")
    return {"status": "sent", "training": training, "round": number, "package_id": sent["package_id"],
            "bytes_in": bytes_in, "bytes_out": sent["bytes"], "metrics": metrics}
