"""Which client address the per-IP limit charges, behind trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from flashsale.settings import Settings
from gateway import appkeys
from gateway.routes.flashsales import client_ip

pytestmark = pytest.mark.unit


def _request(*forwarded: str, peer: str = "10.0.0.5") -> web.Request:
    app = web.Application()
    app[appkeys.SETTINGS] = Settings(trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    headers = CIMultiDict(("X-Forwarded-For", line) for line in forwarded)
    return make_mocked_request("GET", "/", headers=headers, app=app).clone(remote=peer)


def test_one_forwarded_line() -> None:
    assert client_ip(_request("198.51.100.7, 10.0.0.9")) == "198.51.100.7"


def test_spoofed_first_line_does_not_win() -> None:
    # the client sends its own X-Forwarded-For; the trusted proxy adds a second line
    request = _request("203.0.113.99", "198.51.100.7")
    assert client_ip(request) == "198.51.100.7"


def test_untrusted_peer_ignores_the_header() -> None:
    assert client_ip(_request("203.0.113.99", peer="192.0.2.1")) == "192.0.2.1"


def test_a_hop_that_is_no_address_charges_the_proxy_that_passed_it() -> None:
    # never a Redis key, never text of a reply (raw bytes: tests/test_header_bytes.py)
    assert client_ip(_request("1.2.3.4\u00ff, 10.0.0.9")) == "10.0.0.9"
    assert client_ip(_request("garbage")) == "10.0.0.5"
    assert client_ip(_request("198.51.100.7, garbage, 10.0.0.9")) == "10.0.0.9"
