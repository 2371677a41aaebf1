"""A queued sale's settings: its own values (``flash_sales.queue_settings``) over the
``FLASHSALE_QUEUE_*`` defaults. Zero switches a bot-defence limit off."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Final

import orjson

from flashsale.settings import Settings

MODES: Final = ("open", "queued")
# Device ids one client IP may bring to a sale whose device limit is on, unless the sale says
# otherwise: the id is the client's choice, so the address bounds how many it can invent.
DEVICES_PER_IP: Final = 32


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a sale may set a setting to (the API validates against it)."""

    min: float | None = None
    max: float | None = None
    doc: str | None = None


def _bounded(lo: float, hi: float, doc: str | None = None, **default: Any) -> Any:
    return field(metadata={"bounds": Bounds(lo, hi, doc)}, **default)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    admit_per_s: float = _bounded(0, 1e6)  # 0: follow the measured accept rate
    # admit up to remaining x this, for admitted shoppers who never join
    overbook: float = _bounded(1, 10)
    join_window_s: int = _bounded(5, 3600)  # how long an admission lasts
    # the waiting room opens this long before the start
    opens_before_s: int = _bounded(0, 7 * 24 * 3600)
    # enter calls per account (repeats included)
    max_attempts_per_account: int = _bounded(0, 1_000_000, default=0)
    max_entrants_per_ip: int = _bounded(0, 1_000_000, default=0)  # accounts from one client IP
    # accounts entering with one X-Device-Id
    max_entrants_per_device: int = _bounded(0, 1_000_000, default=0)
    max_devices_per_ip: int = _bounded(
        0,
        1_000_000,
        "with max_entrants_per_device: X-Device-Id values one client IP may bring "
        "(default 32; 0: no limit)",
        default=DEVICES_PER_IP,
    )
    # accounts younger than this cannot enter
    min_account_age_min: int = _bounded(0, 5_256_000, default=0)
    # leading zero bits of the proof of work on enter (0: none)
    pow_difficulty: int = _bounded(0, 28, default=0)
    # the join token is accepted only as the URL's segment
    hidden_join_path: bool = field(default=False, metadata={"bounds": Bounds()})

    @classmethod
    def of(cls, own: dict[str, Any], settings: Settings) -> QueueConfig:
        base: dict[str, Any] = {
            "admit_per_s": settings.queue_admit_per_s,
            "overbook": settings.queue_overbook,
            "join_window_s": settings.queue_join_window_s,
            "opens_before_s": settings.queue_opens_before_s,
        }
        names = {f.name for f in fields(cls)}
        base.update({k: v for k, v in own.items() if k in names and v is not None})
        return cls(**base)

    @classmethod
    def parse(cls, raw: bytes, settings: Settings) -> QueueConfig:
        """From the JSON the sale hash carries (field ``qcfg``, written by load_sale)."""
        own = orjson.loads(raw) if raw else {}
        return cls.of(own if isinstance(own, dict) else {}, settings)

    def public(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def settable() -> dict[str, tuple[type, Bounds]]:
    """Each setting a sale may give (``queue`` on create and update), with its type and
    bounds, in declaration order: declared once, here."""
    kinds: dict[str, type] = {"int": int, "float": float, "bool": bool}
    return {f.name: (kinds[str(f.type)], f.metadata["bounds"]) for f in fields(QueueConfig)}
