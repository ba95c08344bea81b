"""Membership inference: how well an attacker tells a model's training records from others.

The audit runs where the data lives: the owner of a dataset scores a model it received on its own
members (records the model was trained on) and non-members (records it never saw), and keeps only
the figures. The attack is the loss-threshold attack (Yeom et al., 2018): a record whose loss under
the model is low is guessed a member. Its ROC over all thresholds gives the AUC (0.5: the model
tells nothing) and the true-positive rate at a 1 % false-positive rate (Carlini et al., 2022: what
an attacker who must rarely be wrong achieves); `advantage` is max(TPR - FPR).

`owner_audit` is the owner's audit of a model it received: members are the rows it released that
the model's lineage reaches, non-members its own test set (never released, same sensor). Only the
figures are kept (`record_audit`: registry tags, audit log); the origin's review of an export signs
them into its approval document (`signed_figures`) and the supplier's export gate reads them as
`model.membership_audits` (`gate_audit`; policies/model_release/membership.rego).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ATTACK = "loss-threshold"
LOW_FPR = 0.01


def record_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each record under the model's logits (numerically stable)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]


def attack_figures(member_losses: np.ndarray, non_member_losses: np.ndarray) -> dict[str, Any]:
    """AUC, TPR at 1 % FPR and advantage of the loss-threshold attack on these losses."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if len(member_losses) == 0 or len(non_member_losses) == 0:
        raise ValueError("a membership audit needs members and non-members")
    truth = np.concatenate([np.ones(len(member_losses)), np.zeros(len(non_member_losses))])
    score = -np.concatenate([member_losses, non_member_losses])  # low loss: guessed a member
    fpr, tpr, _ = roc_curve(truth, score)
    return {
        "attack": ATTACK,
        "auc": round(float(roc_auc_score(truth, score)), 6),
        "tpr_at_1pct_fpr": round(float(tpr[fpr <= LOW_FPR].max(initial=0.0)), 6),
        "advantage": round(float((tpr - fpr).max()), 6),
        "members": int(len(member_losses)),
        "non_members": int(len(non_member_losses)),
    }


def audit_logits(member: tuple[np.ndarray, np.ndarray], non_member: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The attack's figures from (logits, labels) of members and of non-members."""
    return attack_figures(record_losses(*member), record_losses(*non_member))


# ---------------------------------------------------------------------------- audits where the data lives

SAMPLES = 200  # records of each side at most: equal counts of members and non-members
SEED = 0
AUDIT_ACTION = "model.membership_audit"
TAG_PREFIX = "factory.membership."
FIGURES = ("auc", "tpr_at_1pct_fpr", "advantage")
GATE_FIELDS = ("auc", "tpr_at_1pct_fpr", "advantage", "members", "non_members", "attack", "model_digest")


def model_logits(model, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """A torch classifier's logits on flat float32 rows."""
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32)))
                               .numpy() for i in range(0, len(x), batch)] or [np.zeros((0, 1))])


def released_members(paths, metadata: dict[str, Any]) -> list[str]:
    """This site's dataset versions a model was trained on, from the model's lineage: the versions
    this site released (its own, in its catalog) of which the lineage holds an identical copy held
    elsewhere that was not cut down further (a copy split or filtered at the trainer's site, like
    stage 8's train/holdout split, leaves unknown which rows trained, so it names no members).
    Rows this site never released (the raw data sanitization cut) are never members."""
    from pipelines.data import catalog

    lineage = [e for e in metadata.get("lineage") or [] if isinstance(e, dict) and isinstance(e.get("dataset_id"), str)]
    cut_further = {p for e in lineage for p in e.get("parents") or [] if isinstance(p, str)}
    found: list[str] = []
    for copy in lineage:
        if copy["dataset_id"].split("/", 1)[0] == paths.site or copy["dataset_id"] in cut_further:
            continue
        for parent in copy.get("parents") or []:
            if not isinstance(parent, str) or parent.split("/", 1)[0] != paths.site:
                continue
            try:
                version = catalog.get(paths, parent)
            except catalog.CatalogError:
                continue
            if version.owner == paths.site and version.md5 == copy.get("md5") and version.id not in found:
                found.append(version.id)
    return found


def _rows(paths, refs: list[str], spec, labels: list[int] | None, *, gated: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Features, labels and record ids of the datasets `refs` (each record once), and the versions' ids."""
    import pandas as pd

    from pipelines.data.catalog import load_dataset
    from pipelines.data.spec import spec_of
    from pipelines.learning import families

    frames, ids = [], []
    for ref in refs:
        # non-members are read as the test set they are (data_access gate, purpose evaluation); members
        # are the owner's own released records, read here and scored here only
        frame, version = load_dataset(paths, ref, **({"action": "read", "purpose": "evaluation"} if gated else {}))
        problem = families.spec_mismatch(spec, spec_of(version.extra), expected_is="the model takes",
                                         actual_is=f"{version.id} holds")
        if problem:
            raise ValueError(problem)
        frames.append(frame)
        ids.append(version.id)
    frame = pd.concat(frames, ignore_index=True).drop_duplicates(subset=[spec.id_column])
    if labels is not None:
        frame = frame[frame[spec.label_column].isin(labels)]
    return spec.features(frame), spec.labels(frame), frame[spec.id_column].astype(str).to_numpy(), ids


def audit_model(paths, model_dir: Path, members: list[str], non_members: list[str], *,
                labels: list[int] | None = None, samples: int = SAMPLES, seed: int = SEED) -> dict[str, Any]:
    """The loss-threshold attack on `model_dir` at site `paths`: `members` and `non_members` are
    dataset versions of this site's catalog. Equal counts of each (at most `samples`, a seeded draw),
    restricted to `labels` when the model trained on a subset of classes; a record in both is dropped
    from the non-members. Returns the figures, the counts, the datasets and the model's digest (no
    record, no record id): what may be recorded and sent."""
    from pipelines.learning import families
    from pipelines.learning.artifacts import load_model, model_digest

    model_dir = Path(model_dir)
    if not members or not non_members:
        raise ValueError("a membership audit needs member and non-member datasets")
    digest = model_digest(model_dir)
    meta = json.loads((model_dir / "metadata.json").read_text())
    spec = families.metadata_spec(meta)
    xm, ym, ids_m, member_versions = _rows(paths, members, spec, labels, gated=False)
    xn, yn, ids_n, non_member_versions = _rows(paths, non_members, spec, labels, gated=True)
    fresh = ~np.isin(ids_n, ids_m)
    xn, yn = xn[fresh], yn[fresh]
    n = min(len(ym), len(yn), int(samples))
    if n < 2:
        raise ValueError(f"too few records for a membership audit ({len(ym)} members, {len(yn)} non-members)")
    rng = np.random.default_rng(seed)
    pick_m = np.sort(rng.choice(len(ym), size=n, replace=False))
    pick_n = np.sort(rng.choice(len(yn), size=n, replace=False))
    model = load_model(model_dir)
    figures = audit_logits((model_logits(model, xm[pick_m]), ym[pick_m]), (model_logits(model, xn[pick_n]), yn[pick_n]))
    return {"audited": True, **figures, "model_digest": digest, "member_datasets": member_versions,
            "non_member_datasets": non_member_versions, "samples": int(samples), "seed": int(seed),
            **({"labels": sorted(labels)} if labels is not None else {})}


def owner_audit(paths, model_dir: Path, test_sets: dict[str, str] | None) -> dict[str, Any]:
    """This site's audit, as the owner of data a received model was trained on: members are the rows
    it released that the model's lineage reaches (`released_members`), non-members its own test set
    (the first of `test_sets`: records of the same sensor and partitioning that never left the site
    and that no model trained on). Never raises: `{"audited": false, "reason", ...}` when the model
    holds none of this site's data or cannot be scored."""
    from pipelines.learning.artifacts import model_digest

    model_dir = Path(model_dir)
    try:
        digest = model_digest(model_dir)
        meta = json.loads((model_dir / "metadata.json").read_text())
        members = released_members(paths, meta)
        if not members:
            return {"audited": False, "no_members": True, "model_digest": digest, "reason": "the model's lineage "
                    f"holds no dataset {paths.site} released (no members to audit)"}
        if not test_sets:
            return {"audited": False, "model_digest": digest, "reason": f"{paths.site} names no test set"}
        subset = (meta.get("training") or {}).get("subset") or {}
        labels = subset.get("labels") if isinstance(subset, dict) else None
        result = audit_model(paths, model_dir, members, [next(iter(test_sets.values()))],
                             labels=[int(v) for v in labels] if isinstance(labels, list) else None)
    except Exception as error:  # recorded, not raised: a policy that requires an audit denies for want of one
        text = str(error).strip() or type(error).__name__
        return {"audited": False, "model_digest": locals().get("digest"), "reason": f"not audited: {text[:300]}"}
    return result


def summary(result: dict[str, Any] | None) -> str:
    """One line for people: the figures and counts, or why there are none."""
    if not result:
        return "no membership audit"
    if not result.get("audited"):
        return str(result.get("reason") or "not audited")
    return (f"{result['attack']} attack AUC {result['auc']:.3f}, TPR at 1% FPR {result['tpr_at_1pct_fpr']:.3f}, "
            f"advantage {result['advantage']:.3f} on {result['members']} members "
            f"({', '.join(result['member_datasets'])}) and {result['non_members']} non-members "
            f"({', '.join(result['non_member_datasets'])})")


def record_audit(ctx, ref, result: dict[str, Any], *, actor: str | None = None, tags: bool = True) -> None:
    """The audit as `factory.membership.*` tags of the registered version `ref` (a registry.ModelRef;
    unless `tags` is False: an audit on datasets of someone's choosing leaves the standard one's tags)
    and an audit log entry (`model.membership_audit`, by `actor`, default the site's service) at this
    site (`ctx`: anything with `paths` and `site`); figures only, never records."""
    from pipelines.learning import registry
    from pipelines.trust import audit

    values = {"audited": str(bool(result.get("audited"))).lower(), "model_digest": str(result.get("model_digest"))}
    if result.get("audited"):
        values |= {k: str(result[k]) for k in (*FIGURES, "members", "non_members", "attack")}
        values["member_datasets"] = ",".join(result["member_datasets"])
        values["non_member_datasets"] = ",".join(result["non_member_datasets"])
    else:
        values["reason"] = str(result.get("reason"))[:250]
    if tags:
        try:
            client = registry.client(ctx.paths)
            for key, value in values.items():
                client.set_model_version_tag(ref.name, ref.version, TAG_PREFIX + key, value)
        except Exception as error:  # the audit stands (audit log, review record); only its MLflow copy is missing
            print(f"membership audit not tagged on {ref.uri}: {error}")
    audit.append(ctx.paths, action=AUDIT_ACTION, actor=actor or f"svc-{ctx.site}", object=ref.uri,
                 outcome="success" if result.get("audited") else "not_audited",
                 details={k: v for k, v in result.items() if k != "audited"})


def received_audit(ctx, record: dict[str, Any], test_sets: dict[str, str] | None) -> dict[str, Any]:
    """The owner's audit of a received, registered model (`receive_model`'s record: name, version),
    recorded as tags and in the audit log where the model holds this site's data; never raises."""
    from pipelines.learning import registry

    try:
        ref = registry.resolve_model(ctx.paths, f"{record['name']}/{record['version']}")
    except Exception as error:  # noqa: BLE001 - reported as a result
        return {"audited": False, "reason": f"not audited: {str(error)[:300]}"}
    result = owner_audit(ctx.paths, ref.model_dir, test_sets)
    if not result.get("no_members"):  # a model without this site's data is no business of this site's audit
        record_audit(ctx, ref, result)
    print(f"membership audit of {ref.uri} at {ctx.site}: {summary(result)}")
    return result


def signed_figures(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of an audit goes into the owner's signed approval document (None: no audit to sign)."""
    if not result or not result.get("audited"):
        return None
    return {k: result[k] for k in (*GATE_FIELDS, "member_datasets", "non_member_datasets")}


def gate_audit(figures: Any, *, owner: str) -> dict[str, Any] | None:
    """A `model.membership_audits` entry of the model_release gate from the figures of a verified
    signed document of `owner` (the verified signer, not a field of the figures); None when they are
    not well-formed figures."""
    if not isinstance(figures, dict):
        return None
    numbers = all(isinstance(figures.get(k), (int, float)) and not isinstance(figures.get(k), bool)
                  and 0.0 <= figures[k] <= 1.0 for k in FIGURES)
    counts = all(isinstance(figures.get(k), int) and not isinstance(figures.get(k), bool) and figures[k] > 0
                 for k in ("members", "non_members"))
    digest = figures.get("model_digest")
    if not (numbers and counts and isinstance(digest, str) and digest.startswith("sha256:") and len(digest) == 71
            and isinstance(figures.get("attack"), str) and len(figures["attack"]) <= 64):
        return None
    return {"owner": owner, **{k: figures[k] for k in GATE_FIELDS}}
