"""Stampede: shoppers wait for the sale to open, hammer join, poll their order; some pay.

Headless, from the repo root, with the gateway up (payments by the sandbox provider,
``FLASHSALE_PAYMENT_PROVIDER=sandbox``, as ``flashsale up`` with demo data runs it) and a
sale created (its id in LOCUST_SALE_ID); tokens minted up front, no password hashing at
load time:

    python -m loadtests.mint --count 20000 --out tokens.txt
    LOCUST_TOKENS_FILE=tokens.txt LOCUST_SALE_ID=1 LOCUST_OUTCOMES=out/outcomes \\
      locust -f loadtests/locustfile_stampede.py --headless -u 5000 -r 1000 -t 60s \\
        --processes -1 -H http://127.0.0.1:8080 --csv out/stampede --html out/stampede.html
    python -m loadtests.invariants --sale-id 1 --accepted-file 'out/outcomes.*'

``--processes -1`` forks one Locust process per core (one process tops out near 5k req/s);
each process writes its own outcome file ``out/outcomes.<pid>`` and takes its own share of
the tokens.

Environment:
- LOCUST_TOKENS_FILE  tokens, one per line (``python -m loadtests.mint``); default
                      ``tokens.txt`` when it exists
- LOCUST_SALE_ID      the sale to join; default: the running one the gateway lists (the newest
                      of several), else the newest upcoming one, said in one line; none
                      stops the run at once in one line
- LOCUST_SALE_START   epoch seconds the sale opens; default: ``start_time`` from GET the sale
- LOCUST_OUTCOMES     prefix of the per-process outcome files for loadtests.invariants
                      (default ``out/outcomes``: what the report reads by default)
- LOCUST_PAY_SHARE    share of winners who pay (default 0.3; 0 against a gateway without
                      a payment provider)
- LOCUST_JOIN_TRIES   joins per shopper while answered 429/503/NOT_STARTED (default 5)
- LOCUST_POLLS        order polls per winner (default 10)
- LOCUST_NEXT_SHOPPER_S  mean pause before a virtual user comes back as the next shopper
                      (default 1)

Tasks, by their names in Locust's statistics:
- sale:  GET  /api/v1/flash-sales/[id]       the sale's start time (once per virtual user)
- join:  POST /api/v1/flash-sales/[id]/join  one Idempotency-Key for all of a shopper's tries
- poll:  GET  /api/v1/orders/[id]            a winner's order, until it leaves ``queued``
- pay:   POST /api/v1/orders/[id]/pay        with probability LOCUST_PAY_SHARE, once the
                                             order is ``pending_payment``

Each run of the task is one shopper with the next token: wait for the start, join, record
the outcome, poll, maybe pay. Then the virtual user pauses and comes back as the next
shopper, for the whole run; once every token was used, tokens come round again and those
shoppers are answered LIMIT_EXCEEDED (or SOLD_OUT). Every 409 (SOLD_OUT, LIMIT_EXCEEDED,
SALE_ENDED, ...) and 429 is an expected answer, not a failure.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import datetime

from locust import FastHttpUser, between, events, task

from loadtests.scenario_support import (
    DEFAULT_OUTCOMES,
    OutcomeLog,
    announce_host,
    env_float,
    env_int,
    env_str,
    running_gateway,
    sale_for_the_run,
    token_pool,
)

SALE_ID = env_int("LOCUST_SALE_ID", 0)
PAY_SHARE = env_float("LOCUST_PAY_SHARE", 0.3)
JOIN_TRIES = env_int("LOCUST_JOIN_TRIES", 5)
POLLS = env_int("LOCUST_POLLS", 10)
NEXT_SHOPPER_S = env_float("LOCUST_NEXT_SHOPPER_S", 1.0)
OUTCOMES = OutcomeLog(env_str("LOCUST_OUTCOMES", DEFAULT_OUTCOMES))
_RUN = {"sale_id": 0}  # the sale of this run, chosen once at init


@events.quitting.add_listener
def _close(environment, **_kwargs):
    OUTCOMES.close()


@events.init.add_listener
def _default_host(environment, **_kwargs):
    announce_host(environment)
    _RUN["sale_id"] = OUTCOMES.sale_id = sale_for_the_run(environment, "open")


class Shopper(FastHttpUser):
    """A stream of shoppers: wait for the start, join, poll, maybe pay; then the next."""

    host = running_gateway()  # -H wins; without it, the gateway `flashsale up` runs
    weight = 10
    wait_time = between(0.0, 2 * NEXT_SHOPPER_S)

    def on_start(self):
        sale_id = SALE_ID or _RUN["sale_id"]
        OUTCOMES.sale_id = sale_id
        self.tokens = token_pool(self.environment)
        self.sale_path = f"/api/v1/flash-sales/{sale_id}"
        self.start = env_float("LOCUST_SALE_START", 0.0)

    def _sale_start(self):
        """Epoch seconds the sale opens (asked once per virtual user)."""
        if not self.start:
            with self.client.get(
                self.sale_path, name="/api/v1/flash-sales/[id]", catch_response=True
            ) as resp:
                data = (_json(resp).get("data") or {}) if resp.status_code == 200 else {}
                start_at = data.get("start_time") or data.get("start_at")
                if start_at:
                    self.start = datetime.fromisoformat(start_at).timestamp()
        return self.start

    def _join(self, auth):
        """Return the order id, or None after recording why not."""
        headers = {**auth, "Idempotency-Key": uuid.uuid4().hex}
        reason = "NO_ANSWER"
        for _ in range(JOIN_TRIES):
            with self.client.post(
                f"{self.sale_path}/join",
                json={"quantity": 1},
                headers=headers,
                name="/api/v1/flash-sales/[id]/join",
                catch_response=True,
            ) as resp:
                body = _json(resp)
                if resp.status_code == 202:
                    order_id = str((body.get("data") or {}).get("order_id"))
                    OUTCOMES.accepted(order_id)
                    resp.success()
                    return order_id
                reason = str(body.get("error") or f"HTTP_{resp.status_code}")
                if reason == "NOT_STARTED":  # clocks differ a little: wait and knock again
                    resp.success()
                    time.sleep(0.2)
                    continue
                if resp.status_code == 409:
                    resp.success()
                    OUTCOMES.rejected(reason)
                    return None
                if resp.status_code in (429, 503):
                    resp.success()
                    time.sleep(random.uniform(0.05, 0.3))
                    continue
                resp.failure(f"{resp.status_code} {reason}")
                break
        OUTCOMES.rejected(reason)
        return None

    def _poll(self, order_id, auth):
        """The order's status once it left ``queued`` (or ``queued`` after LOCUST_POLLS)."""
        status = "queued"
        for _ in range(POLLS):
            with self.client.get(
                f"/api/v1/orders/{order_id}",
                headers=auth,
                name="/api/v1/orders/[id]",
                catch_response=True,
            ) as resp:
                if resp.status_code == 200:
                    status = (_json(resp).get("data") or {}).get("status", status)
                    if status != "queued":
                        return status
                elif resp.status_code == 404:
                    resp.success()  # not persisted yet
            time.sleep(0.2)
        return status

    def _pay(self, order_id, auth):
        with self.client.post(
            f"/api/v1/orders/{order_id}/pay",
            json={"payment_method": "alipay"},
            headers=auth,
            name="/api/v1/orders/[id]/pay",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(_pay_failure(resp))

    @task
    def stampede(self):
        """One shopper."""
        auth = {"Authorization": f"Bearer {self.tokens.take()}"}
        delay = self._sale_start() - time.time()
        if delay > 0:
            time.sleep(min(delay, 300))
        order_id = self._join(auth)
        if order_id is None:
            return
        status = self._poll(order_id, auth)
        if status == "pending_payment" and random.random() < PAY_SHARE:
            self._pay(order_id, auth)


def _pay_failure(resp):
    reason = str(_json(resp).get("error") or f"HTTP_{resp.status_code}")
    if reason == "PAYMENT_PROVIDER_UNAVAILABLE":
        return (
            f"{resp.status_code} {reason}: run the gateway with "
            "FLASHSALE_PAYMENT_PROVIDER=sandbox, or set LOCUST_PAY_SHARE=0"
        )
    return f"{resp.status_code} {reason}"


def _json(resp):
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
