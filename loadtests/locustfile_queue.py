"""Queue: shoppers enter a queued sale's waiting room before the start, poll with backoff,
and join through their admission's join path once admitted.

Headless, from the repo root, with the gateway up and a queued sale created (``"mode":
"queued"`` at create or patch; its id in LOCUST_SALE_ID); tokens minted up front:

    python -m loadtests.mint --count 20000 --out tokens.txt
    LOCUST_TOKENS_FILE=tokens.txt LOCUST_SALE_ID=1 LOCUST_OUTCOMES=out/outcomes \\
      locust -f loadtests/locustfile_queue.py --headless -u 5000 -r 1000 -t 120s \\
        --processes -1 -H http://127.0.0.1:8080 --csv out/queue --html out/queue.html
    python -m loadtests.invariants --sale-id 1 --accepted-file 'out/outcomes.*'

The invariant report of a queued sale adds admitted vs joined vs accepted, joins without
admission (must be 0) and the fairness figures (lottery: arrival vs drawn position near 0;
position vs order time near +1).

Environment:
- LOCUST_TOKENS_FILE  tokens, one per line (``python -m loadtests.mint``); default
                      ``tokens.txt`` when it exists
- LOCUST_SALE_ID      the queued sale; default: the running one the gateway lists (the newest
                      of several), else the newest upcoming one, said in one line; none
                      stops the run at once in one line
- LOCUST_OUTCOMES     prefix of the per-process outcome files for loadtests.invariants
                      (default ``out/outcomes``: what the report reads by default)
- LOCUST_ABANDON_SHARE  share of admitted shoppers who never join (default 0.05)
- LOCUST_POLL_MAX_S   longest pause between two polls (default 5; the backoff doubles from
                      the server's hint, starting at 0.25 s)
- LOCUST_NEXT_SHOPPER_S  mean pause before a virtual user comes back as the next shopper
                      (default 1)

Tasks, by their names in Locust's statistics:
- enter: POST /api/v1/flash-sales/[id]/enter             the ticket (a sale that asks for a
                                                          proof of work is answered with a
                                                          challenge, solved here, then again)
- queue: GET  /api/v1/flash-sales/[id]/queue             until admitted, sold out or ended
- join:  POST /api/v1/flash-sales/[id]/join/[admission]  the admission's hidden join path

Each run of the task is one shopper with the next token. Every 409 (SOLD_OUT, SALE_ENDED,
ADMISSION_EXPIRED, ...) and 429 is an expected answer, not a failure; each shopper's end is
written to the outcome file (accepted with its order id, or rejected with the reason).
"""

from __future__ import annotations

import random
import time
import uuid

from locust import FastHttpUser, between, events, task

from flashsale.waitingroom.signing import solve
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
ABANDON_SHARE = env_float("LOCUST_ABANDON_SHARE", 0.05)
POLL_MAX_S = env_float("LOCUST_POLL_MAX_S", 5.0)
NEXT_SHOPPER_S = env_float("LOCUST_NEXT_SHOPPER_S", 1.0)
OUTCOMES = OutcomeLog(env_str("LOCUST_OUTCOMES", DEFAULT_OUTCOMES))
_RUN = {"sale_id": 0}  # the sale of this run, chosen once at init
FINAL_STATES = {"sold_out", "ended", "expired"}


@events.quitting.add_listener
def _close(environment, **_kwargs):
    OUTCOMES.close()


@events.init.add_listener
def _default_host(environment, **_kwargs):
    announce_host(environment)
    _RUN["sale_id"] = OUTCOMES.sale_id = sale_for_the_run(environment, "queued")


class QueuedShopper(FastHttpUser):
    """A stream of shoppers: enter, poll with backoff, join when admitted; then the next."""

    host = running_gateway()
    wait_time = between(0.0, 2 * NEXT_SHOPPER_S)

    def on_start(self):
        sale_id = SALE_ID or _RUN["sale_id"]
        OUTCOMES.sale_id = sale_id
        self.tokens = token_pool(self.environment)
        self.sale_path = f"/api/v1/flash-sales/{sale_id}"

    def _enter(self, auth):
        """The ticket, or None after recording why not."""
        body = None
        for _ in range(3):
            with self.client.post(
                f"{self.sale_path}/enter",
                json=body,
                headers=auth,
                name="/api/v1/flash-sales/[id]/enter",
                catch_response=True,
            ) as resp:
                data = _json(resp)
                if resp.status_code in (200, 201):
                    return (data.get("data") or {}).get("ticket")
                reason = str(data.get("error") or f"HTTP_{resp.status_code}")
                if reason == "PROOF_REQUIRED":
                    resp.success()
                    puzzle = data.get("data") or {}
                    challenge = puzzle["challenge"]
                    body = {
                        "challenge": challenge,
                        "solution": solve(challenge, puzzle["difficulty"]),
                    }
                    continue
                if resp.status_code in (409, 429, 403, 400):
                    resp.success()
                else:
                    resp.failure(f"{resp.status_code} {reason}")
                OUTCOMES.rejected(reason)
                return None
        OUTCOMES.rejected("PROOF_REQUIRED")
        return None

    def _wait_for_admission(self, ticket, auth):
        """The poll answer once admitted (or final), None when the run ends first; with the
        bearer, as a sale with a hidden join path hands the path to the ticket's account only."""
        pause = 0.25
        while self.environment.runner is None or self.environment.runner.state != "stopping":
            with self.client.get(
                f"{self.sale_path}/queue",
                params={"ticket": ticket},
                headers=auth,
                name="/api/v1/flash-sales/[id]/queue",
                catch_response=True,
            ) as resp:
                if resp.status_code != 200:
                    resp.failure(f"{resp.status_code} {_json(resp).get('error')}")
                    return None
                view = _json(resp).get("data") or {}
            if view.get("state") == "admitted" or view.get("state") in FINAL_STATES:
                return view
            hint = view.get("estimated_wait_s") or pause
            time.sleep(min(POLL_MAX_S, max(0.25, min(pause, hint))) * random.uniform(0.8, 1.2))
            pause = min(POLL_MAX_S, pause * 2)
        return None

    def _join(self, auth, join_path):
        headers = {**auth, "Idempotency-Key": uuid.uuid4().hex}
        reason = "NO_ANSWER"
        for _ in range(5):
            with self.client.post(
                join_path,
                json={"quantity": 1},
                headers=headers,
                name="/api/v1/flash-sales/[id]/join/[admission]",
                catch_response=True,
            ) as resp:
                body = _json(resp)
                if resp.status_code == 202:
                    OUTCOMES.accepted(str((body.get("data") or {}).get("order_id")))
                    return
                reason = str(body.get("error") or f"HTTP_{resp.status_code}")
                resp.success()
                if resp.status_code in (429, 503):
                    time.sleep(random.uniform(0.05, 0.3))
                    continue
                if resp.status_code not in (403, 409):
                    resp.failure(f"{resp.status_code} {reason}")
                break
        OUTCOMES.rejected(reason)

    @task
    def shopper(self):
        """One shopper."""
        auth = {"Authorization": f"Bearer {self.tokens.take()}"}
        ticket = self._enter(auth)
        if ticket is None:
            return
        view = self._wait_for_admission(ticket, auth)
        if view is None:
            return
        if view.get("state") != "admitted":
            OUTCOMES.rejected(str(view.get("state")).upper())
            return
        if random.random() < ABANDON_SHARE:
            OUTCOMES.rejected("ABANDONED")
            return
        self._join(auth, view["join_path"])


def _json(resp):
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
