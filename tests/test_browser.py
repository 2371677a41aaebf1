"""The dashboard and the sale page in a real browser (Debian's chromium via Selenium).

Needs chromium + chromium-driver (``make browser``, which ``make test`` runs, installs them
when root); without them these tests skip. The test starts ``flashsale up``, opens the
dashboard as the demo admin and the sale page as a demo shopper, runs a bounded stampede
from a second process, and checks what a person sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from stack.embedded import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium + chromium-driver: run `make browser` (as root)",
)
STOCK = 20
STAMPEDE = 120  # shoppers in the stampede, one join each
SHOTS = Path(os.environ.get("FLASHSALE_SCREENSHOTS", tempfile.gettempdir())) / "flashsale-shots"


def _env(data_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    return {**env, "FLASHSALE_DATA_DIR": data_dir}


def _http(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, str]]:
    """`flashsale up` on a free port: (base URL, data folder)."""
    with tempfile.TemporaryDirectory(prefix="flashsale-browser-") as data_dir:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "stack", "up"],
            env={
                **_env(data_dir),
                "FLASHSALE_HTTP_PORT": str(port),
                "FLASHSALE_WORKERS": "2",
                "FLASHSALE_ACCESS_LOG": "false",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "flashsale up: not ready in time"
                try:
                    with urllib.request.urlopen(base + "/readyz", timeout=2):
                        break
                except OSError:
                    time.sleep(0.3)
            yield base, data_dir
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def _sku_with_stock(data_dir: str) -> int:
    database = json.loads((Path(data_dir) / "stack.json").read_text())["database_url"]

    async def find() -> int:
        conn = await asyncpg.connect(database)
        try:
            sku: int = await conn.fetchval(
                "SELECT id FROM skus WHERE on_hand >= $1 ORDER BY on_hand DESC, id LIMIT 1", STOCK
            )
            return sku
        finally:
            await conn.close()

    return asyncio.run(find())


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1280,1800")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for _refused
    return webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=opts)


def _refused_by_policy(driver: Any) -> list[str]:
    """What the page's Content-Security-Policy blocked (the console says so): nothing, for
    pages that load only their own scripts and styles."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]


def _wait(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not seen in {timeout_s}s: {what}")


def _text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


@needs_browser
@pytest.mark.timeout(400)
def test_people_see_the_sale(stack: tuple[str, str]) -> None:
    from selenium.webdriver.common.by import By

    base, data_dir = stack
    admin = _http(
        "POST",
        base + "/api/v1/auth/login",
        {"login": "admin@demo.local", "password": "admin-pass-1"},
    )["token"]
    now = datetime.now(UTC)
    sale = _http(
        "POST",
        base + "/api/v1/admin/flash-sales",
        {
            "sku_id": _sku_with_stock(data_dir),
            "flash_price": 9900,
            "quantity": STOCK,
            "per_user_limit": 1,
            "start_at": (now - timedelta(seconds=1)).isoformat(),
            "end_at": (now + timedelta(hours=1)).isoformat(),
        },
        admin,
    )
    sale_id = sale["flash_sale_id"]
    tokens = Path(data_dir) / "tokens.txt"
    minted = subprocess.run(
        [sys.executable, "-m", "loadtests.mint", "--count", str(STAMPEDE), "--out", str(tokens)],
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert minted.returncode == 0, minted.stdout + minted.stderr

    board, shop = _browser(), _browser()
    try:
        # the dashboard, as the admin, on the sale
        board.get(base + "/dashboard")
        board.find_element(By.ID, "login-email").send_keys("admin@demo.local")
        board.find_element(By.ID, "login-password").send_keys("admin-pass-1")
        board.find_element(By.ID, "login-submit").click()
        row = _wait(
            "the sale in the list",
            lambda: board.find_elements(By.CSS_SELECTOR, f'tr[data-sale-id="{sale_id}"]'),
        )
        row[0].click()
        _wait("live figures", lambda: _text(board, "v-remaining") == str(STOCK))
        assert "active" in _text(board, "sales")

        # the sale page, as a shopper who joins before the stampede
        shop.set_window_size(420, 900)  # a phone
        shop.get(f"{base}/sale/{sale_id}")
        _wait("the product", lambda: _text(shop, "remaining") == str(STOCK))
        assert _text(shop, "price").startswith("¥99.00")
        shop.find_element(By.ID, "shop-email").send_keys("shopper1@demo.local")
        shop.find_element(By.ID, "shop-password").send_keys("shopper-pass-1")
        shop.find_element(By.ID, "shop-login-submit").click()
        join = _wait(
            "an enabled join button",
            lambda: [b for b in shop.find_elements(By.ID, "join") if b.is_enabled()],
        )
        join[0].click()
        _wait("the order", lambda: _text(shop, "order-id"))
        assert shop.find_element(By.TAG_NAME, "body").get_attribute("data-feed") == "stream"

        # the stampede, from a second process
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtests.burst",
                "--base",
                base,
                "--sale",
                str(sale_id),
                "--tokens",
                str(tokens),
                "--count",
                str(STAMPEDE),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        burst = json.loads(result.stdout.strip().splitlines()[-1])
        assert burst["outcomes"].get("202") == STOCK - 1, burst
        last_unit = burst["last_accepted_at"]

        # the shopper's page says sold out within 2 s of the last unit
        _wait(
            "sold out on the sale page",
            lambda: (
                shop.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "sold_out"
            ),
            timeout_s=10,
        )
        seen_sold_out = time.time()
        print(f"the sale page said sold out {seen_sold_out - last_unit:.2f}s after the last unit")
        assert seen_sold_out - last_unit <= 2.0, f"{seen_sold_out - last_unit:.2f}s"
        assert _text(shop, "banner") == "Sold out"
        assert _text(shop, "remaining") == "0"

        # the shopper's order goes to pending payment, with a way to pay
        _wait(
            "pending payment",
            lambda: (
                shop.find_element(By.ID, "order-state").get_attribute("data-status")
                == "pending_payment"
            ),
            timeout_s=60,
        )
        assert shop.find_element(By.ID, "pay").is_displayed()

        # the dashboard: remaining 0, accepted = stock, refusal reasons
        _wait("remaining 0 on the dashboard", lambda: _text(board, "v-remaining") == "0")
        _wait("accepted = stock", lambda: _text(board, "v-accepted") == str(STOCK))
        refusals = _wait(
            "a refusal reason",
            lambda: board.find_elements(By.CSS_SELECTOR, '#refusals li[data-reason="SOLD_OUT"]'),
        )
        assert "sold out" in refusals[0].text
        _wait(
            "every order out of the queue",
            lambda: (
                _text(board, "o-queued") == "0" and _text(board, "o-pending_payment") == str(STOCK)
            ),
            timeout_s=60,
        )
        _wait("sold out in the list", lambda: "sold out" in _text(board, "sales"), 10)
        _merchant_sees_its_own_figures(base, sale_id)
        time.sleep(2)  # a couple more points on the charts
        SHOTS.mkdir(parents=True, exist_ok=True)
        board.save_screenshot(str(SHOTS / "dashboard.png"))
        shop.save_screenshot(str(SHOTS / "sale-page.png"))
        assert (SHOTS / "dashboard.png").stat().st_size > 10_000

        # the admin's actions, each behind a confirmation: cancel changes nothing, confirm acts
        qty = board.find_element(By.ID, "topup-qty")
        qty.clear()
        qty.send_keys("5")
        board.find_element(By.ID, "topup-btn").click()
        _wait("the confirmation", lambda: board.find_element(By.ID, "confirm").is_displayed())
        assert "Add 5 units" in _text(board, "confirm-text")
        board.find_element(By.ID, "confirm-cancel").click()
        time.sleep(1.5)
        assert _text(board, "v-remaining") == "0"
        board.find_element(By.ID, "topup-btn").click()
        _wait("the confirmation", lambda: board.find_element(By.ID, "confirm").is_displayed())
        board.find_element(By.ID, "confirm-ok").click()
        _wait("the top-up on the dashboard", lambda: _text(board, "v-remaining") == "5")
        _wait(
            "the sale page open again",
            lambda: shop.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "active",
            timeout_s=10,
        )
        board.find_element(By.ID, "close-btn").click()
        _wait("the confirmation", lambda: board.find_element(By.ID, "confirm").is_displayed())
        board.find_element(By.ID, "confirm-ok").click()
        _wait("closed in the list", lambda: "closed" in _text(board, "sales"), 15)
        _wait("ended on the sale page", lambda: _text(shop, "banner") == "This sale has ended")

        # a contingency plan from the dashboard, behind the same confirmation (the plans'
        # table is drawn anew every 5 s: find, read and click in one step)
        row = '#plans tr[data-plan="pause-background"]'
        _wait("the plans", lambda: _click(board, f'{row} button[data-mode="on"]'))
        _wait("the confirmation", lambda: board.find_element(By.ID, "confirm").is_displayed())
        assert "pause-background on" in _text(board, "confirm-text")
        board.find_element(By.ID, "confirm-ok").click()
        _wait("the plan on", lambda: _css_text(board, f"{row} .plan-mode") == "on")
        _wait("logged", lambda: "pause-background: off → on" in _text(board, "plan-log"))
        _wait("the off switch", lambda: _click(board, f'{row} button[data-mode="off"]'))
        _wait("the confirmation", lambda: board.find_element(By.ID, "confirm").is_displayed())
        board.find_element(By.ID, "confirm-ok").click()
        _wait("the plan off", lambda: _css_text(board, f"{row} .plan-mode") == "off")
        assert _refused_by_policy(board) == [] and _refused_by_policy(shop) == []
    finally:
        board.quit()
        shop.quit()


def _merchant_sees_its_own_figures(base: str, sale_id: int) -> None:
    """The demo merchant (whose product the sale sells) watches it: its sale's figures,
    none of the platform's (those tiles hidden), and the page runs without an error."""
    from selenium.webdriver.common.by import By

    merchant = _browser()
    try:
        merchant.get(base + "/dashboard")
        merchant.find_element(By.ID, "login-email").send_keys("merchant@demo.local")
        merchant.find_element(By.ID, "login-password").send_keys("merchant-pass-1")
        merchant.find_element(By.ID, "login-submit").click()
        row = _wait(
            "the sale in the merchant's list",
            lambda: merchant.find_elements(By.CSS_SELECTOR, f'tr[data-sale-id="{sale_id}"]'),
        )
        row[0].click()
        _wait("the merchant's live figures", lambda: _text(merchant, "v-remaining") == "0")
        _wait("accepted = stock", lambda: _text(merchant, "v-accepted") == str(STOCK))
        for platform in ("v-p50", "v-lag", "v-dead", "refusals", "c-latency", "c-consumer"):
            assert not merchant.find_element(By.ID, platform).is_displayed(), platform
        errors = [
            e["message"]
            for e in merchant.get_log("browser")
            if e["level"] == "SEVERE" and "/favicon.ico" not in e["message"]  # none is served
        ]
        assert errors == [], errors
    finally:
        merchant.quit()


QUEUED_AHEAD = 8  # shoppers who enter (through the API) before the two on the page
QUEUED_STOCK = QUEUED_AHEAD + 1  # the first page shopper gets the last unit; the second waits
SHOTS_DOCS = Path(__file__).resolve().parent.parent / "docs"


def _click(driver: Any, css: str) -> bool:
    """Click what ``css`` finds; False (try again) if it is not there or was redrawn."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if not found:
            return False
        found[0].click()
    except StaleElementReferenceException:
        return False
    return True


def _css_text(driver: Any, css: str) -> str | None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return str(found[0].text) if found else None
    except StaleElementReferenceException:
        return None


def _call(
    method: str, url: str, body: Any = None, token: str | None = None, **headers: str
) -> tuple[int, Any]:
    """(status, envelope) of a request, whatever the status."""
    headers = {"Content-Type": "application/json", **headers}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _enter_and_join(base: str, sale_id: int, token: str, entered: threading.Event) -> str:
    """A shopper who is not on a page: enters (solving the proof of work), polls its place
    and joins through its admission's URL; the order id."""
    from flashsale.waitingroom.signing import solve

    url = f"{base}/api/v1/flash-sales/{sale_id}"
    status, env = _call("POST", url + "/enter", {}, token)
    assert (status, env["error"]) == (403, "PROOF_REQUIRED"), env
    c = env["data"]
    solution = solve(c["challenge"], c["difficulty"])
    status, env = _call(
        "POST", url + "/enter", {"challenge": c["challenge"], "solution": solution}, token
    )
    assert status == 201, env
    entered.set()
    ticket = urllib.parse.quote(env["data"]["ticket"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, env = _call("GET", f"{url}/queue?ticket={ticket}")
        assert status == 200, env
        if env["data"]["state"] == "admitted":
            status, env = _call("POST", base + env["data"]["join_path"], {"quantity": 1}, token)
            assert status == 202, env
            return str(env["data"]["order_id"])
        time.sleep(0.1)
    raise AssertionError("not admitted in 60 s")


def _shopper_page(base: str, sale_id: int, email: str, password: str) -> Any:
    from selenium.webdriver.common.by import By

    page = _browser()
    page.set_window_size(420, 900)  # a phone
    page.get(f"{base}/sale/{sale_id}")
    _wait("the product", lambda: _text(page, "remaining") == str(QUEUED_STOCK))
    page.find_element(By.ID, "shop-email").send_keys(email)
    page.find_element(By.ID, "shop-password").send_keys(password)
    page.find_element(By.ID, "shop-login-submit").click()
    return page


def _attr(driver: Any, element_id: str, name: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).get_attribute(name) or "")


def _body(driver: Any, name: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").get_attribute(f"data-{name}") or "")


def _body_is(driver: Any, name: str, value: str) -> bool:
    return _body(driver, name) == value


def _place(driver: Any) -> str:
    """The page's place in the queue once shown (hidden elements read as empty)."""
    text = _text(driver, "queue-position").replace(",", "")
    return text if text.isdigit() else ""


def _enabled(driver: Any, element_id: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(driver.find_element(By.ID, element_id).is_enabled())


def _entered_or_failed(entered: threading.Event, job: Future[str]) -> bool:
    return entered.is_set() or job.done()


@needs_browser
@pytest.mark.timeout(300)
def test_a_queued_sale_on_the_page(stack: tuple[str, str]) -> None:
    """A queued sale with a proof of work: a shopper enters from the page, sees its place,
    is admitted, joins and sees its order go to pending payment; a shopper still waiting sees
    "sold out" within 2 s of the last unit; the dashboard shows the waiting room."""
    from selenium.webdriver.common.by import By

    base, data_dir = stack
    admin = _http(
        "POST",
        base + "/api/v1/auth/login",
        {"login": "admin@demo.local", "password": "admin-pass-1"},
    )["token"]
    now = datetime.now(UTC)
    sale_id = _http(
        "POST",
        base + "/api/v1/admin/flash-sales",
        {
            "sku_id": _sku_with_stock(data_dir),
            "flash_price": 4900,
            "quantity": QUEUED_STOCK,
            "per_user_limit": 1,
            "start_at": (now - timedelta(seconds=1)).isoformat(),
            "end_at": (now + timedelta(hours=1)).isoformat(),
            "mode": "queued",
            # one admission a second keeps the page shopper waiting a few seconds
            "queue": {"admit_per_s": 1, "overbook": 1, "join_window_s": 60, "pow_difficulty": 16},
        },
        admin,
    )["flash_sale_id"]
    tokens = Path(data_dir) / "tokens-queued.txt"
    minted = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.mint",
            "--count",
            str(QUEUED_AHEAD),
            "--out",
            str(tokens),
        ],
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert minted.returncode == 0, minted.stdout + minted.stderr
    ahead = tokens.read_text().split()

    # a join without an admission is refused (and counted among the refusals)
    status, env = _call(
        "POST", f"{base}/api/v1/flash-sales/{sale_id}/join", {"quantity": 1}, ahead[0]
    )
    assert (status, env["error"]) == (403, "NOT_ADMITTED"), env

    board = _browser()
    pages: list[Any] = []
    try:
        board.get(base + "/dashboard")
        board.find_element(By.ID, "login-email").send_keys("admin@demo.local")
        board.find_element(By.ID, "login-password").send_keys("admin-pass-1")
        board.find_element(By.ID, "login-submit").click()
        row = _wait(
            "the sale in the list",
            lambda: board.find_elements(By.CSS_SELECTOR, f'tr[data-sale-id="{sale_id}"]'),
        )
        row[0].click()
        _wait("live figures", lambda: _text(board, "v-remaining") == str(QUEUED_STOCK))

        first = _shopper_page(base, sale_id, "shopper2@demo.local", "shopper-pass-2")
        pages.append(first)
        second = _shopper_page(base, sale_id, "shopper3@demo.local", "shopper-pass-3")
        pages.append(second)
        for page in pages:
            assert _body(page, "mode") == "queued"
            assert not page.find_element(By.ID, "join").is_displayed()
            _wait("the enter button", partial(_enabled, page, "enter"))

        with ThreadPoolExecutor(QUEUED_AHEAD) as pool:
            # the shoppers ahead enter one after the other (first come, first served) …
            joins = []
            for token in ahead:
                entered = threading.Event()
                job = pool.submit(_enter_and_join, base, sale_id, token, entered)
                joins.append(job)
                _wait("an API shopper in", partial(_entered_or_failed, entered, job))
                if job.done():
                    job.result()  # its failure
            # … then the two page shoppers, each solving the proof of work in the page
            # "waiting" shows as soon as the ticket is in; the place itself comes with the
            # page's next read of the queue. The first page's place is read before the second
            # page solves its proof (seconds on a busy machine, while admissions go on).
            for page in pages:
                page.find_element(By.ID, "enter").click()
                _wait("a place in the queue", partial(_body_is, page, "queue", "waiting"))
                print(f"the page solved the proof of work in {_body(page, 'pow-ms')} ms")
                if page is first:
                    position = int(_wait("the place shown", partial(_place, first)))
                    assert position > 1
                    assert 0 <= int(_text(first, "queue-ahead")) < position
                    assert first.find_element(By.ID, "queue-place").is_displayed()
                    assert not first.find_element(By.ID, "join").is_displayed()
                    SHOTS.mkdir(parents=True, exist_ok=True)
                    first.save_screenshot(str(SHOTS / "sale-page-queued.png"))

            # the dashboard shows the waiting room: its length and the admission rate
            rates: list[float] = []

            def admitted() -> bool:
                rates.append(float(_text(board, "v-admit") or 0))
                return _attr(first, "queue-state", "data-state") == "admitted"

            _wait("the first page shopper admitted", admitted, 60)
            assert first.find_element(By.ID, "join").is_enabled()
            assert first.find_element(By.ID, "join-window").is_displayed()
            assert _attr(second, "queue-state", "data-state") == "waiting"
            orders = [j.result(timeout=60) for j in joins]
        assert len(set(orders)) == QUEUED_AHEAD
        assert max(rates) > 0, rates
        assert board.find_element(By.ID, "waiting-room").is_displayed()

        # the last unit: the first page shopper joins; the second, still waiting, is told
        clicked = time.time()
        first.find_element(By.ID, "join").click()
        _wait("the order", lambda: _text(first, "order-id"))
        _wait("sold out on the waiting page", lambda: _body(second, "status") == "sold_out", 10)
        seen = time.time()
        print(
            f"the waiting shopper's page said sold out {seen - clicked:.2f}s after the join click"
        )
        assert seen - clicked <= 2.0, f"{seen - clicked:.2f}s"
        assert _text(second, "banner") == "Sold out"
        assert _attr(second, "queue-state", "data-state") == "sold_out"
        assert not second.find_element(By.ID, "join").is_displayed()
        _wait(
            "pending payment",
            lambda: _attr(first, "order-state", "data-status") == "pending_payment",
            timeout_s=60,
        )

        assert _body(second, "feed") == "stream"

        # the ticket survives a reload; without EventSource the page polls instead
        second.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.EventSource;"}
        )
        second.refresh()
        _wait("the queue state after a reload", lambda: _body(second, "queue") == "sold_out")
        assert _body(second, "feed") == "poll"
        assert not second.find_element(By.ID, "enter").is_displayed()
        assert _text(second, "banner") == "Sold out"

        # units come back: the next in line is admitted, and told when its window has passed
        _http(
            "PATCH",
            f"{base}/api/v1/admin/flash-sales/{sale_id}",
            {"add_quantity": 1, "queue": {"join_window_s": 5}},
            admin,
        )
        _wait("the second shopper admitted", partial(_body_is, second, "queue", "admitted"), 15)
        assert second.find_element(By.ID, "join").is_enabled()
        assert second.find_element(By.ID, "join-window").is_displayed()
        _wait("the admission expired", partial(_body_is, second, "queue", "expired"), 15)
        assert "expired" in _text(second, "queue-state")
        assert not second.find_element(By.ID, "join").is_enabled()

        # the dashboard: the refusal of the join without an admission
        _wait(
            "NOT_ADMITTED among the refusals",
            lambda: board.find_elements(
                By.CSS_SELECTOR, '#refusals li[data-reason="NOT_ADMITTED"]'
            ),
        )
        _wait("the unit back on the dashboard", lambda: _text(board, "v-remaining") == "1")
    finally:
        board.quit()
        for page in pages:
            page.quit()


@needs_browser
@pytest.mark.timeout(300)
def test_the_api_docs_render_under_their_policy(stack: tuple[str, str]) -> None:
    """/api/v1/docs: Swagger UI (vendored) draws every operation of the gateway's own
    document, and its strict Content-Security-Policy refuses nothing it needs."""
    from selenium.webdriver.common.by import By

    base, _ = stack
    with urllib.request.urlopen(base + "/api/v1/openapi.json", timeout=30) as resp:
        spec = json.loads(resp.read())
    operations = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    driver = _browser()
    try:
        driver.get(base + "/api/v1/docs")
        _wait(
            "every operation drawn",
            lambda: len(driver.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(operations),
            60,
        )
        drawn = {
            (
                block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
                block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute(
                    "data-path"
                ),
            )
            for block in driver.find_elements(By.CSS_SELECTOR, ".opblock")
        }
        assert drawn == operations
        log = driver.get_log("browser")
        refused = [e["message"] for e in log if "Content Security Policy" in e["message"]]
        assert refused == []
        # the browser asks for /favicon.ico on its own; the service has none
        errors = [e["message"] for e in log if e["level"] == "SEVERE"]
        assert [m for m in errors if "/favicon.ico " not in m] == []
    finally:
        driver.quit()
