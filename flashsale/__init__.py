"""The flash-sale core: settings, stores, scripts, the event contract, errors and the domain.

Nothing here knows about HTTP (``gateway/``) or the Kafka consumers (``consumers/``); both
import from here, never the other way round.
"""
