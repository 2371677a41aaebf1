"""A queued sale's settings: its own values (``flash_sales.queue_settings``) over the
``FLASHSALE_QUEUE_*`` defaults. Zero switches a bot-defence limit off."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Final

import orjson

from flashsale.settings import Settings

MODES: Final = ("open", "queued")
# Device ids one client IP may bring to a sale whose device limit is on, unless the sale says
# otherwise: the id is the client's choice, so the address bounds how many it can invent.
DEVICES_PER_IP: Final = 32


@dataclass(frozen=True, slots=True)
class QueueConfig:
    admit_per_s: float  # 0: follow the measured accept rate
    overbook: float  # admit up to remaining x this, for admitted shoppers who never join
    join_window_s: int  # how long an admission lasts
    opens_before_s: int  # the waiting room opens this long before the start
    max_attempts_per_account: int = 0  # enter calls per account (repeats included)
    max_entrants_per_ip: int = 0  # accounts entering from one client IP
    max_entrants_per_device: int = 0  # accounts entering with one X-Device-Id
    max_devices_per_ip: int = DEVICES_PER_IP  # X-Device-Id values one client IP brings
    min_account_age_min: int = 0  # accounts younger than this cannot enter
    pow_difficulty: int = 0  # leading zero bits of the proof of work on enter (0: none)
    hidden_join_path: bool = False  # the join token is accepted only as the URL's segment

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
