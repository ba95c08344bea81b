"""Capability restrictions of an export variant: classes the model abstains on, a cap on the confidence it returns.

A restriction is chosen when the variant is trained (stage 5's `restrictions` trigger param), written
into the model's metadata.json (signed and sealed with the model, so it cannot change in transit),
shown to the officers, checked by the `model_release` gate against the destination's licence
(`required_restrictions`) and enforced by `factory serve` (`pipelines.serving.app`) wherever the model runs.

Its form, in metadata and on the wire: `{"abstain_classes": [3, 7], "max_confidence": 0.9}`, both keys
optional; `{}` is no restriction. `parse` is the one check of that form; `apply` is the one place
that turns logits into what a restricted model may return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KEYS = ("abstain_classes", "max_confidence")


class RestrictionError(ValueError):
    """A restriction that is malformed or does not fit the model's classes; the message says why."""


def parse(value: Any, n_classes: int | None = None) -> dict[str, Any]:
    """`value` as a normalised restriction (sorted distinct classes, a float cap; keys only when given).

    `n_classes` (the data's classes) bounds the class indices and keeps at least one class the
    model may still answer with; None checks the form alone."""
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise RestrictionError(f"restrictions must be an object, not {str(value)[:80]}")
    unknown = sorted(str(k)[:40] for k in value if k not in KEYS)
    if unknown:
        raise RestrictionError(f"unknown restriction {', '.join(unknown)} (known: {', '.join(KEYS)})")
    out: dict[str, Any] = {}
    if "abstain_classes" in value:
        classes = value["abstain_classes"]
        if not isinstance(classes, list) or not classes or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes):
            raise RestrictionError(f"abstain_classes must be a non-empty list of class indices, not {str(classes)[:80]}")
        if len(set(classes)) != len(classes):
            raise RestrictionError(f"abstain_classes {classes} names a class twice")
        if n_classes is not None:
            outside = sorted(c for c in classes if c >= n_classes)
            if outside:
                raise RestrictionError(f"abstain_classes names no class {outside} of this data "
                                       f"(class indices 0..{n_classes - 1})")
            if len(classes) >= n_classes:
                raise RestrictionError(f"abstain_classes {sorted(classes)} leaves no class of the {n_classes} "
                                       "to answer with")
        out["abstain_classes"] = sorted(classes)
    if "max_confidence" in value:
        cap = value["max_confidence"]
        if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 0.0 < cap <= 1.0:
            raise RestrictionError(f"max_confidence must be a number in (0, 1], not {str(cap)[:40]}")
        out["max_confidence"] = float(cap)
    return out


def describe(restrictions: dict[str, Any] | None) -> str:
    """One line for people: what the restriction does ("none" when there is none)."""
    parts = []
    if (restrictions or {}).get("abstain_classes"):
        parts.append("abstains on classes " + ", ".join(str(c) for c in restrictions["abstain_classes"]))
    if (restrictions or {}).get("max_confidence") is not None:
        parts.append(f"confidence capped at {restrictions['max_confidence']:g}")
    return "; ".join(parts) or "none"


@dataclass(frozen=True)
class Outputs:
    """Per row: the class returned (None: the model abstains), its confidence (None when abstaining), abstained."""

    labels: list[int | None]
    confidences: list[float | None]
    abstained: list[bool]


def apply(logits: np.ndarray, restrictions: dict[str, Any] | None) -> Outputs:
    """What a model with `restrictions` returns for `logits` (rows × classes).

    The label is the most probable class; when it is an abstained class the row is an abstention
    (no label, no confidence). The confidence is the softmax probability of the label, at most
    `max_confidence`. With no restriction this is the plain argmax and its probability."""
    from scipy.special import softmax

    restrictions = restrictions or {}
    probabilities = softmax(np.asarray(logits, dtype=np.float64), axis=1)
    best = probabilities.argmax(axis=1)
    top = probabilities[np.arange(len(best)), best]
    cap = restrictions.get("max_confidence")
    if cap is not None:
        top = np.minimum(top, cap)
    abstain = set(restrictions.get("abstain_classes") or ())
    labels: list[int | None] = []
    confidences: list[float | None] = []
    abstained: list[bool] = []
    for label, confidence in zip(best.tolist(), top.tolist(), strict=True):
        refused = label in abstain
        labels.append(None if refused else int(label))
        confidences.append(None if refused else float(confidence))
        abstained.append(refused)
    return Outputs(labels, confidences, abstained)
