"""Stampede: shoppers wait for the sale to open, hammer join, poll their order; some pay.

Headless, from the repo root, with the gateway up and a sale created (its id in
LOCUST_SALE_ID); tokens minted up front, no password hashing at load time:

    python -m loadtests.mint --count 20000 --out tokens.txt
    LOCUST_TOKENS_FILE=tokens.txt LOCUST_SALE_ID=1 LOCUST_OUTCOMES=out/outcomes \\
      locust -f loadtests/locustfile_stampede.py --headless -u 5000 -r 1000 -t 60s \\
        --processes -1 -H http://127.0.0.1:8080 --csv out/stampede --html out/stampede.html
    python -m loadtests.invariants --sale-id 1 --accepted-file 'out/outcomes.*'

``--processes -1`` forks one Locust process per core (one process tops out near 5k req/s).

Environment:
- LOCUST_TOKENS_FILE  tokens, one per line (``python -m loadtests.mint``); required
- LOCUST_SALE_ID      the sale to join; required
- LOCUST_SALE_START   epoch seconds the sale opens; default: ``start_at`` from GET the sale
- LOCUST_OUTCOMES     prefix of the per-process outcome files for loadtests.invariants
- LOCUST_PAY_SHARE    share of winners who pay (default 0.3)
- LOCUST_JOIN_TRIES   joins per shopper while answered 429/503 (default 5)
- LOCUST_POLLS        order polls per winner (default 10)

Each shopper is one token: waits for the start, joins (one Idempotency-Key for all of
its retries), records the outcome, polls ``GET /orders/{id}`` until the order leaves
``queued``, pays with probability LOCUST_PAY_SHARE, then stops. 409 and 429 are
expected answers, not failures.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from datetime import datetime

from locust import FastHttpUser, events, task
from locust.exception import StopUser

from loadtests.scenario_support import OutcomeLog, TokenPool, env_float, env_int, env_str

SALE_ID = env_int("LOCUST_SALE_ID", 0)
PAY_SHARE = env_float("LOCUST_PAY_SHARE", 0.3)
JOIN_TRIES = env_int("LOCUST_JOIN_TRIES", 5)
POLLS = env_int("LOCUST_POLLS", 10)
OUTCOMES = OutcomeLog(env_str("LOCUST_OUTCOMES"))
_pool: TokenPool | None = None


@events.init.add_listener
def _tokens(environment, **_kwargs):
    global _pool
    runner = environment.runner
    index = getattr(runner, "worker_index", 0) or 0
    processes = getattr(environment.parsed_options, "processes", None) or 1
    stride = os.cpu_count() or 1 if processes == -1 else max(1, processes)
    _pool = TokenPool(env_str("LOCUST_TOKENS_FILE"), index % stride, stride)


@events.quitting.add_listener
def _close(environment, **_kwargs):
    OUTCOMES.close()


class Shopper(FastHttpUser):
    """One shopper: wait for the start, join, poll, maybe pay."""

    weight = 10

    def on_start(self):
        if not SALE_ID:
            raise RuntimeError("set LOCUST_SALE_ID")
        assert _pool is not None
        self.auth = {"Authorization": f"Bearer {_pool.take()}"}
        self.sale_path = f"/api/v1/flash-sales/{SALE_ID}"

    def _wait_for_start(self):
        start = env_float("LOCUST_SALE_START", 0.0)
        if not start:
            with self.client.get(
                self.sale_path, name="/api/v1/flash-sales/[id]", catch_response=True
            ) as resp:
                data = (resp.json() or {}).get("data") or {} if resp.status_code == 200 else {}
                start_at = data.get("start_time") or data.get("start_at")
                if start_at:
                    start = datetime.fromisoformat(start_at).timestamp()
        delay = start - time.time()
        if delay > 0:
            time.sleep(min(delay, 300))

    def _join(self):
        """Return the order id, or None after recording why not."""
        headers = {**self.auth, "Idempotency-Key": uuid.uuid4().hex}
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

    @task
    def stampede(self):
        self._wait_for_start()
        order_id = self._join()
        if order_id is not None:
            status = "queued"
            for _ in range(POLLS):
                with self.client.get(
                    f"/api/v1/orders/{order_id}",
                    headers=self.auth,
                    name="/api/v1/orders/[id]",
                    catch_response=True,
                ) as resp:
                    if resp.status_code == 200:
                        status = (_json(resp).get("data") or {}).get("status", status)
                        if status != "queued":
                            break
                    elif resp.status_code == 404:
                        resp.success()  # not persisted yet
                    time.sleep(0.2)
            if status == "pending_payment" and random.random() < PAY_SHARE:
                self.client.post(
                    f"/api/v1/orders/{order_id}/pay",
                    json={"payment_method": "alipay"},
                    headers=self.auth,
                    name="/api/v1/orders/[id]/pay",
                )
        raise StopUser


def _json(resp):
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
