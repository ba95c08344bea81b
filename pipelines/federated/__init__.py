"""Federated learning: models travel, data stays (issue 20).

The algorithms, implemented here rather than taken from Flower: Flower cannot share Airflow 3.3's
environment (its FastAPI pins conflict), and as a step of its own (another image or venv) it would
still bring its own transport, a long-lived gRPC link from each site to the coordinator's SuperLink,
which bypasses what every crossing here goes through (sealed, signed packages, the model_release
gate, the audit log, the carrier: mutual-TLS inbox or removable media for air-gapped partners).
Each algorithm is small enough to test against its published behaviour:

- `updates`: model updates as flat float32 vectors over a state_dict; a participant's local
  training step (FedAvg, FedProx's proximal term).
- `aggregation`: fedavg, fedprox, median, trimmed_mean, krum, multi_krum by name.
- `secure`: secure aggregation with dropout recovery (Bonawitz et al. 2017) on X25519, HKDF,
  ChaCha20, AES-GCM from `cryptography` and Shamir sharing over a prime field.
- `privacy`: DP-FedAvg clipping and Gaussian noise, epsilon from opacus's RDP accountant.
- `rounds`: rounds in one process (simulation, tests, benchmarks) with stragglers, a convergence
  rule and per-round metrics.

No Airflow here: the stage DAGs call these functions at each site and move the updates as sealed
packages.
"""

from pipelines.federated.aggregation import RULES, AggregationError, aggregate
from pipelines.federated.privacy import PrivacyError, UpdatePrivacy, clip_update, epsilon
from pipelines.federated.rounds import (
    FederatedResult,
    Participant,
    RoundRecord,
    run_rounds,
    scaled,
    sign_flipped,
)
from pipelines.federated.secure import (
    SecAggCoordinator,
    SecAggError,
    SecAggParticipant,
    SecAggSetup,
    secure_sum,
)
from pipelines.federated.updates import (
    FederatedError,
    LocalConfig,
    LocalUpdate,
    StateLayout,
    apply_update,
    evaluate_state,
    local_update,
    update_bytes,
    update_from_bytes,
)

__all__ = [
    "RULES", "AggregationError", "FederatedError", "FederatedResult", "LocalConfig", "LocalUpdate", "Participant",
    "PrivacyError", "RoundRecord", "SecAggCoordinator", "SecAggError", "SecAggParticipant", "SecAggSetup",
    "StateLayout", "UpdatePrivacy", "aggregate", "apply_update", "clip_update", "epsilon", "evaluate_state",
    "local_update", "run_rounds", "scaled", "secure_sum", "sign_flipped", "update_bytes", "update_from_bytes",
]
