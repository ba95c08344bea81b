"""Secure aggregation: the coordinator learns the sum of the participants' updates, not one of them.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS),
the double-masking protocol, for three or more participants, with `cryptography`'s primitives only:

1. Keys. Each participant u makes two X25519 key pairs, a mask key s_u and a channel key c_u, and a
   random self-mask seed b_u; it advertises both public keys and a SHA-256 commitment to b_u.
2. Shares. u splits s_u's private key and b_u into Shamir shares (threshold t of n, over the prime
   field GF(2^521 - 1): a secret-sharing scheme, not a cipher) and sends each other participant v
   its shares, encrypted with AES-GCM under HKDF(X25519(c_u, c_v)); the coordinator relays them
   without being able to read them.
3. Masked input. u quantises its vector to fixed point in Z_2^64 and adds PRG(b_u) and, for every
   other participant v, +PRG(s_uv) when v sorts after u and -PRG(s_uv) when before, where s_uv is
   HKDF(X25519(s_u, s_v)) and the PRG is the ChaCha20 keystream. Pairwise masks cancel in the sum.
4. Unmasking. The coordinator names the survivors (masked input received) and the dropped. Each
   survivor answers once with its shares of b_u for every survivor u and of s_v for every dropped
   v, never both for one participant. From t answers the coordinator rebuilds the self masks and
   the dropped participants' mask keys (checked against their advertised public keys and
   commitments), removes them and is left with the exact sum of the survivors' quantised vectors.

Fewer than t answers reveal nothing of a secret (any value fits t - 1 shares) and the coordinator
stops. The shares and masked vectors are the payloads the carrier's sealed packages move; this
module keeps no state on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # a Mersenne prime: the Shamir field holds any 32-byte secret
FRAC_BITS = 24  # fixed point: 2^-24 resolution; |sum| < 2^39 fits Z_2^64 as two's complement
MIN_PARTICIPANTS = 3


class SecAggError(ValueError):
    """Secure aggregation cannot go on: too few participants or shares, a bad share or vector."""


# --- Shamir secret sharing over GF(PRIME) -------------------------------------------------------

def shamir_split(secret: int, n: int, t: int) -> list[tuple[int, int]]:
    """n shares (x, y) of `secret`, x = 1..n, any t of which rebuild it (Shamir 1979)."""
    if not 1 <= t <= n:
        raise SecAggError(f"a threshold of {t} of {n} shares is not possible")
    if not 0 <= secret < PRIME:
        raise SecAggError("the secret does not fit the Shamir field")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def shamir_combine(shares: Sequence[tuple[int, int]]) -> int:
    """The value at 0 of the polynomial through `shares` (Lagrange). With fewer shares than the
    threshold this is an unrelated number: callers check the count first."""
    xs = [x for x, _ in shares]
    if not shares or len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("shares must have distinct, non-zero x coordinates")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                numerator = numerator * -xj % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


# --- fixed point and masks ------------------------------------------------------------------------

def quantise(vector: np.ndarray, frac_bits: int = FRAC_BITS, *, parties: int = 1) -> np.ndarray:
    """`vector` as fixed point in Z_2^64 (uint64, two's complement), refusing values whose sum over
    `parties` vectors could wrap around."""
    values = np.asarray(vector, dtype=np.float64)
    limit = 2.0 ** (62 - frac_bits) / max(parties, 1)
    if not np.all(np.isfinite(values)) or (values.size and np.abs(values).max() >= limit):
        raise SecAggError(f"values must be finite and below {limit:.3g} in magnitude to sum {parties} "
                          f"vectors at {frac_bits} fractional bits")
    return np.round(values * 2.0**frac_bits).astype(np.int64).view(np.uint64)


def dequantise(quantised: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    return np.asarray(quantised, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**frac_bits


def mask_stream(seed: bytes, dimension: int) -> np.ndarray:
    """`dimension` pseudo-random uint64 values: the ChaCha20 keystream under the 32-byte `seed`."""
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * dimension)), dtype=np.uint64).copy()


def _hkdf(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


def _pair(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


@dataclass(frozen=True)
class SecAggSetup:
    """One round's secure aggregation: its id (bound into every derived key), the participants
    (names, sorted), the threshold t of shares that rebuild a secret, the vector length."""

    round_id: str
    participants: tuple[str, ...]
    dimension: int
    threshold: int | None = None
    frac_bits: int = FRAC_BITS

    def __post_init__(self) -> None:
        names = tuple(sorted(self.participants))
        object.__setattr__(self, "participants", names)
        n = len(names)
        if len(set(names)) != n:
            raise SecAggError(f"participant names repeat: {list(names)}")
        if n < MIN_PARTICIPANTS:
            raise SecAggError(f"secure aggregation needs at least {MIN_PARTICIPANTS} participants (with two, "
                              f"the sum and one's own vector give away the other's); the round has {n}")
        if self.threshold is None:
            object.__setattr__(self, "threshold", n // 2 + 1)
        if not 2 <= self.threshold <= n:
            raise SecAggError(f"threshold {self.threshold} must be between 2 and the {n} participants")
        if self.dimension < 1:
            raise SecAggError("the vectors to aggregate must have at least one value")

    def to_dict(self) -> dict[str, object]:
        return {"round_id": self.round_id, "participants": list(self.participants), "dimension": self.dimension,
                "threshold": self.threshold, "frac_bits": self.frac_bits}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SecAggSetup:
        try:
            return cls(str(data["round_id"]), tuple(data["participants"]), int(data["dimension"]),
                       int(data["threshold"]), int(data.get("frac_bits", FRAC_BITS)))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"not a secure aggregation setup: {exc}") from None

    def index(self, name: str) -> int:
        """The participant's Shamir x coordinate (1..n)."""
        try:
            return self.participants.index(name) + 1
        except ValueError:
            raise SecAggError(f"{name!r} is not a participant of round {self.round_id}") from None


@dataclass(frozen=True)
class PublicKeys:
    mask: bytes
    channel: bytes
    self_mask_commitment: bytes

    def to_dict(self) -> dict[str, str]:
        return {"mask": self.mask.hex(), "channel": self.channel.hex(),
                "self_mask_commitment": self.self_mask_commitment.hex()}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> PublicKeys:
        try:
            keys = cls(bytes.fromhex(data["mask"]), bytes.fromhex(data["channel"]),
                       bytes.fromhex(data["self_mask_commitment"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"not a participant's public keys: {exc}") from None
        if len(keys.mask) != 32 or len(keys.channel) != 32 or len(keys.self_mask_commitment) != 32:
            raise SecAggError("public keys and the commitment must be 32 bytes each")
        return keys


class SecAggParticipant:
    """A participant's side of one round. Its secrets never leave it except as Shamir shares."""

    def __init__(self, name: str, setup: SecAggSetup) -> None:
        setup.index(name)
        self.name, self.setup = name, setup
        self._mask_key = X25519PrivateKey.generate()
        self._channel_key = X25519PrivateKey.generate()
        self._self_seed = os.urandom(32)
        self._roster: dict[str, PublicKeys] = {}
        self._held: dict[str, tuple[int, int, int]] = {}  # sender -> (x, share of s_sender, share of b_sender)
        self._answered = False

    def private_state(self) -> dict[str, object]:
        """Everything this participant must keep between the phases of a round (separate tasks):
        secrets, to store at its own site only (e.g. a 0600 file beside its keys), never in a package."""
        return {"name": self.name, "setup": self.setup.to_dict(),
                "mask_key": self._mask_key.private_bytes_raw().hex(),
                "channel_key": self._channel_key.private_bytes_raw().hex(), "self_seed": self._self_seed.hex(),
                "roster": {n: k.to_dict() for n, k in self._roster.items()},
                "held": {n: [x, str(k), str(b)] for n, (x, k, b) in self._held.items()}, "answered": self._answered}

    @classmethod
    def from_private_state(cls, state: Mapping[str, object]) -> SecAggParticipant:
        """The participant `private_state` saved, to continue its round."""
        try:
            party = cls(str(state["name"]), SecAggSetup.from_dict(state["setup"]))
            party._mask_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["mask_key"]))
            party._channel_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["channel_key"]))
            party._self_seed = bytes.fromhex(state["self_seed"])
            party._roster = {n: PublicKeys.from_dict(k) for n, k in state["roster"].items()}
            party._held = {n: (int(x), int(k), int(b)) for n, (x, k, b) in state["held"].items()}
            party._answered = bool(state["answered"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SecAggError(f"not a saved secure aggregation participant: {exc}") from None
        return party

    def public_keys(self) -> PublicKeys:
        return PublicKeys(self._mask_key.public_key().public_bytes_raw(),
                          self._channel_key.public_key().public_bytes_raw(),
                          hashlib.sha256(self._self_seed).digest())

    def _channel(self, other: str) -> AESGCM:
        shared = self._channel_key.exchange(X25519PublicKey.from_public_bytes(self._roster[other].channel))
        return AESGCM(_hkdf(shared, f"secagg-channel|{self.setup.round_id}|{_pair(self.name, other)}"))

    def share_keys(self, roster: Mapping[str, PublicKeys]) -> dict[str, bytes]:
        """Shares of this participant's mask key and self-mask seed, one sealed message per other
        participant (to relay through the coordinator)."""
        missing = set(self.setup.participants) - set(roster)
        if missing:
            raise SecAggError(f"the roster lacks the keys of {sorted(missing)}")
        if roster[self.name] != self.public_keys():
            raise SecAggError(f"the roster does not carry {self.name}'s own public keys")
        self._roster = dict(roster)
        n, t = len(self.setup.participants), self.setup.threshold
        key_shares = shamir_split(int.from_bytes(self._mask_key.private_bytes_raw(), "big"), n, t)
        seed_shares = shamir_split(int.from_bytes(self._self_seed, "big"), n, t)
        sealed = {}
        for other in self.setup.participants:
            i = self.setup.index(other) - 1
            x = key_shares[i][0]
            if other == self.name:
                self._held[self.name] = (x, key_shares[i][1], seed_shares[i][1])
                continue
            plain = json.dumps({"x": x, "mask_key": key_shares[i][1], "self_mask": seed_shares[i][1]}).encode()
            nonce = os.urandom(12)
            aad = f"{self.setup.round_id}|{self.name}|{other}".encode()
            sealed[other] = nonce + self._channel(other).encrypt(nonce, plain, aad)
        return sealed

    def receive_shares(self, sealed: Mapping[str, bytes]) -> None:
        """Open the shares the other participants sent (relayed by the coordinator)."""
        for sender, message in sealed.items():
            if sender == self.name or sender not in self._roster:
                raise SecAggError(f"{self.name} got shares from {sender!r}, not another participant of the round")
            aad = f"{self.setup.round_id}|{sender}|{self.name}".encode()
            try:
                share = json.loads(self._channel(sender).decrypt(message[:12], message[12:], aad))
            except (InvalidTag, ValueError) as exc:
                raise SecAggError(f"the shares {sender} sent {self.name} do not open: {exc or 'bad tag'}") from None
            if share.get("x") != self.setup.index(self.name):
                raise SecAggError(f"the shares {sender} sent {self.name} are for another participant")
            self._held[sender] = (share["x"], int(share["mask_key"]), int(share["self_mask"]))

    def _pairwise(self, other: str) -> np.ndarray:
        shared = self._mask_key.exchange(X25519PublicKey.from_public_bytes(self._roster[other].mask))
        return mask_stream(_hkdf(shared, f"secagg-mask|{self.setup.round_id}|{_pair(self.name, other)}"),
                           self.setup.dimension)

    def masked_input(self, vector: np.ndarray, *, self_mask: bool = True) -> np.ndarray:
        """The vector quantised and masked: uniform-looking uint64 values to send the coordinator.
        `self_mask=False` (rounds keyed by their own round id, see `for_round`): the pairwise masks
        only, so a round without dropouts needs no unmasking."""
        if len(self._held) != len(self.setup.participants):
            missing = sorted(set(self.setup.participants) - set(self._held))
            raise SecAggError(f"{self.name} cannot mask before it holds every participant's shares; missing {missing}")
        vector = np.asarray(vector)
        if vector.shape != (self.setup.dimension,):
            raise SecAggError(f"{self.name}'s vector has shape {list(vector.shape)}, the round sums {self.setup.dimension} values")
        masked = quantise(vector, self.setup.frac_bits, parties=len(self.setup.participants))
        if self_mask:
            masked += mask_stream(self._self_seed, self.setup.dimension)
        for other in self.setup.participants:
            if other > self.name:
                masked += self._pairwise(other)
            elif other < self.name:
                masked -= self._pairwise(other)
        return masked

    def for_round(self, round_id: str) -> SecAggParticipant:
        """This participant (keys, roster, held shares from one setup) for a later round whose
        pairwise masks derive from `round_id`: setup once, fresh masks every round."""
        return SecAggParticipant.from_private_state({**self.private_state(), "answered": False,
                                                     "setup": {**self.setup.to_dict(), "round_id": round_id}})

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str], *,
               self_mask: bool = True) -> dict[str, dict[str, tuple[int, int]]]:
        """This participant's shares for the coordinator, once per round: of the self-mask seed of
        every survivor (unless `self_mask` is False) and of the mask key of every dropped participant,
        never both for one."""
        survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
        if self._answered:
            raise SecAggError(f"{self.name} has already answered the unmasking of round {self.setup.round_id}")
        if set(survivors) & set(dropped) or set(survivors) | set(dropped) != set(self.setup.participants):
            raise SecAggError("survivors and dropped must split the round's participants")
        if self.name not in survivors:
            raise SecAggError(f"{self.name} is named as dropped; it does not reveal shares")
        if len(survivors) < self.setup.threshold:
            raise SecAggError(f"{len(survivors)} survivors are fewer than the threshold {self.setup.threshold}")
        self._answered = True
        return {"self_mask": {u: (self._held[u][0], self._held[u][2]) for u in survivors} if self_mask else {},
                "mask_key": {v: (self._held[v][0], self._held[v][1]) for v in dropped}}


@dataclass
class SecAggCoordinator:
    """The coordinator's side: gathers keys, relays sealed shares, sums masked vectors and removes
    the masks from the shares survivors reveal. It sees masked vectors and the sum only."""

    setup: SecAggSetup
    roster: dict[str, PublicKeys] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    recovered: dict[str, bytes] = field(default_factory=dict)  # mask keys rebuilt by unmasked_sum

    def add_keys(self, name: str, keys: PublicKeys) -> None:
        self.setup.index(name)
        self.roster[name] = keys

    def relay(self, sealed_by_sender: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Sealed shares regrouped by recipient."""
        inbox: dict[str, dict[str, bytes]] = {name: {} for name in self.setup.participants}
        for sender, messages in sealed_by_sender.items():
            for recipient, message in messages.items():
                inbox[recipient][sender] = message
        return inbox

    def add_masked(self, name: str, vector: np.ndarray) -> None:
        self.setup.index(name)
        vector = np.asarray(vector)
        if vector.dtype != np.uint64 or vector.shape != (self.setup.dimension,):
            raise SecAggError(f"{name}'s masked vector must be {self.setup.dimension} uint64 values")
        self.masked[name] = vector

    def split(self) -> tuple[list[str], list[str]]:
        """(survivors, dropped): who sent a masked vector and who did not."""
        survivors = [p for p in self.setup.participants if p in self.masked]
        if len(survivors) < self.setup.threshold:
            raise SecAggError(f"only {len(survivors)} participants sent masked vectors; at least "
                              f"{self.setup.threshold} must, to unmask the round")
        return survivors, [p for p in self.setup.participants if p not in self.masked]

    def _combine(self, shares: list[tuple[int, int]], what: str) -> int:
        if len(shares) < self.setup.threshold:
            raise SecAggError(f"{len(shares)} shares of {what} are fewer than the threshold {self.setup.threshold}")
        return shamir_combine(shares[: self.setup.threshold])

    def unmasked_sum(self, answers: Mapping[str, Mapping[str, Mapping[str, tuple[int, int]]]], *,
                     self_mask: bool = True, known_keys: Mapping[str, bytes] | None = None) -> np.ndarray:
        """The exact sum (float64) of the survivors' quantised vectors, from the survivors' answers
        to `unmask`; refuses fewer than `threshold` answers. `self_mask=False`: the inputs carry
        pairwise masks only; `known_keys`: mask keys of dropped participants rebuilt in an earlier
        round (raw private bytes), so no answer is needed for them (none at all if every dropped
        participant is known)."""
        survivors, dropped = self.split()
        known = dict(known_keys or {})
        answering = [a for a in answers if a in survivors]
        if (self_mask or set(dropped) - set(known)) and len(answering) < self.setup.threshold:
            raise SecAggError(f"{len(answering)} survivors answered the unmasking; {self.setup.threshold} must")
        total = np.zeros(self.setup.dimension, dtype=np.uint64)
        for name in survivors:
            total += self.masked[name]
        for u in survivors if self_mask else ():
            shares = [answers[a]["self_mask"][u] for a in answering if u in answers[a].get("self_mask", {})]
            seed = self._combine(shares, f"{u}'s self mask").to_bytes(66, "big")[-32:]
            if hashlib.sha256(seed).digest() != self.roster[u].self_mask_commitment:
                raise SecAggError(f"the shares of {u}'s self mask do not rebuild the seed it committed to")
            total -= mask_stream(seed, self.setup.dimension)
        for v in dropped:
            if v in known:
                key = X25519PrivateKey.from_private_bytes(known[v])
            else:
                shares = [answers[a]["mask_key"][v] for a in answering if v in answers[a].get("mask_key", {})]
                key = X25519PrivateKey.from_private_bytes(
                    self._combine(shares, f"{v}'s mask key").to_bytes(66, "big")[-32:])
                self.recovered[v] = key.private_bytes_raw()
            if key.public_key().public_bytes_raw() != self.roster[v].mask:
                raise SecAggError(f"the shares of {v}'s mask key do not rebuild the key it advertised")
            for u in survivors:
                shared = key.exchange(X25519PublicKey.from_public_bytes(self.roster[u].mask))
                stream = mask_stream(_hkdf(shared, f"secagg-mask|{self.setup.round_id}|{_pair(u, v)}"),
                                     self.setup.dimension)
                if v > u:  # u added +PRG(s_uv) for a v sorting after it, -PRG for one before
                    total -= stream
                else:
                    total += stream
        return dequantise(total, self.setup.frac_bits)


def secure_sum(vectors: Mapping[str, np.ndarray], *, round_id: str, dropped_after_sharing: Sequence[str] = (),
               threshold: int | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """One whole round in process (simulation and tests): every participant in `vectors` advertises
    keys and shares them; those in `dropped_after_sharing` then send nothing; the coordinator
    unmasks with the survivors' answers. Returns the sum of the survivors' vectors and the bytes
    each survivor sent (keys, sealed shares, masked vector, unmasking answer)."""
    names = sorted(vectors)
    dimension = len(np.asarray(vectors[names[0]])) if names else 0
    setup = SecAggSetup(round_id, tuple(names), dimension, threshold)
    parties = {name: SecAggParticipant(name, setup) for name in names}
    coordinator = SecAggCoordinator(setup)
    for name, party in parties.items():
        coordinator.add_keys(name, party.public_keys())
    sealed = {name: party.share_keys(coordinator.roster) for name, party in parties.items()}
    for name, inbox in coordinator.relay(sealed).items():
        parties[name].receive_shares(inbox)
    sent = {name: 32 + 32 + 32 + sum(len(m) for m in sealed[name].values()) for name in names}
    for name in names:
        if name not in dropped_after_sharing:
            masked = parties[name].masked_input(vectors[name])
            coordinator.add_masked(name, masked)
            sent[name] += masked.nbytes
    survivors, dropped = coordinator.split()
    answers = {name: parties[name].unmask(survivors, dropped) for name in survivors}
    for name in survivors:  # each share: an x coordinate (2 bytes) and a field element (66 bytes)
        sent[name] += 68 * sum(len(part) for part in answers[name].values())
    return coordinator.unmasked_sum(answers), {name: sent[name] for name in survivors}
