"""Membership inference: how well an attacker tells a model's training records from others.

The audit runs where the data lives: the owner of a dataset scores a model it received on its own
members (records the model was trained on) and non-members (records it never saw), and keeps only
the figures. The attack is the loss-threshold attack (Yeom et al., 2018): a record whose loss under
the model is low is guessed a member. Its ROC over all thresholds gives the AUC (0.5: the model
tells nothing) and the true-positive rate at a 1 % false-positive rate (Carlini et al., 2022: what
an attacker who must rarely be wrong achieves); `advantage` is max(TPR - FPR).
"""

from __future__ import annotations

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
