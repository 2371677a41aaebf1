"""A queued sale's settings: its own values (``flash_sales.queue_settings``) over the
``FLASHSALE_QUEUE_*`` defaults, whose ranges and meanings are declared once, in
flashsale/settings.py. Zero switches a bot-defence limit off."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Final

import orjson

from flashsale.settings import PREFIX, Settings, spec

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


def _bounded(lo: float, hi: float, doc: str, **default: Any) -> Any:
    """A setting of the sale's own, with its range and meaning."""
    return field(metadata={"bounds": Bounds(lo, hi, doc)}, **default)


def _overrides(setting: str) -> Any:
    """A sale's own value of the deployment's ``FLASHSALE_<SETTING>``: the same range and
    meaning, declared there (flashsale/settings.py), and its value when the sale has none."""
    s = spec(Settings.__dataclass_fields__[setting])
    doc = f"{s.doc} (default `{PREFIX}{setting.upper()}`)"
    return field(metadata={"bounds": Bounds(s.lo, s.hi, doc), "setting": setting})


@dataclass(frozen=True, slots=True)
class QueueConfig:
    admit_per_s: float = _overrides("queue_admit_per_s")
    overbook: float = _overrides("queue_overbook")
    join_window_s: int = _overrides("queue_join_window_s")
    opens_before_s: int = _overrides("queue_opens_before_s")
    max_attempts_per_account: int = _bounded(
        0, 1_000_000, "enter calls per account, repeats included (0: no limit)", default=0
    )
    max_entrants_per_ip: int = _bounded(
        0, 1_000_000, "accounts entering from one client IP (0: no limit)", default=0
    )
    max_entrants_per_device: int = _bounded(
        0, 1_000_000, "accounts entering with one X-Device-Id (0: no limit)", default=0
    )
    max_devices_per_ip: int = _bounded(
        0,
        1_000_000,
        "with max_entrants_per_device: X-Device-Id values one client IP may bring "
        f"(default {DEVICES_PER_IP}; 0: no limit)",
        default=DEVICES_PER_IP,
    )
    min_account_age_min: int = _bounded(
        0, 5_256_000, "accounts younger than this many minutes cannot enter", default=0
    )
    pow_difficulty: int = _bounded(
        0, 28, "leading zero bits of the proof of work on enter (0: none)", default=0
    )
    hidden_join_path: bool = field(
        default=False,
        metadata={"bounds": Bounds(doc="the join token is accepted only as the URL's segment")},
    )

    @classmethod
    def of(cls, own: dict[str, Any], settings: Settings) -> QueueConfig:
        fs = fields(cls)
        base = {
            f.name: getattr(settings, f.metadata["setting"]) for f in fs if "setting" in f.metadata
        }
        names = {f.name for f in fs}
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
