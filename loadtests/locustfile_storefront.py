"""Storefront mix: browse, search, product detail, cart add/update, checkout, pay.

Headless, from the repo root, with the gateway up (payments by the sandbox provider,
``FLASHSALE_PAYMENT_PROVIDER=sandbox``, as ``flashsale up`` with demo data runs it) and a
catalog loaded:

    python -m loadtests.mint --count 5000 --out tokens.txt
    LOCUST_TOKENS_FILE=tokens.txt \\
      locust -f loadtests/locustfile_storefront.py --headless -u 500 -r 100 -t 60s \\
        --processes -1 -H http://127.0.0.1:8080 --csv out/storefront --html out/storefront.html

Tasks, by weight (of 100) and their names in Locust's statistics:
- browse 40:       GET  /api/v1/products           (``?page=&limit=20``)
- search 20:       GET  /api/v1/products?q=
- detail 20:       GET  /api/v1/products/[id]      (a product a listing showed)
- cart add 8:      POST /api/v1/cart/items         (an in-stock SKU a detail showed)
- cart update 4:   PUT  /api/v1/cart/items/[id]
- checkout 5:      POST /api/v1/cart/checkout      (``shipping_address``: name, phone, address)
- pay 3:           POST /api/v1/orders/[id]/pay    (an order this shopper created)

A task that lacks what it needs does the step before it instead (pay with no unpaid order
checks out, checkout with an empty cart adds to it, ...). Think time LOCUST_THINK_S
(default ``0.5,2``: between 0.5 and 2 s). 409s on cart add, cart update and checkout (out
of stock, price changed, purchase limit, item unavailable) are expected answers, not
failures, and so are 404s on cart update and checkout (another virtual user on the same
account checked the cart out: more users than tokens); anything else at or above 400 is a
failure.

Environment: LOCUST_TOKENS_FILE (default tokens.txt when it exists), LOCUST_SEARCH_TERMS
(comma-separated), LOCUST_THINK_S (``min,max`` seconds).
"""

from __future__ import annotations

import random

from locust import FastHttpUser, between, events, task

from loadtests.scenario_support import announce_host, env_str, running_gateway, token_pool

SEARCH_TERMS = env_str("LOCUST_SEARCH_TERMS", "phone,shoe,coffee,laptop,bag").split(",")
THINK_S = [float(x) for x in env_str("LOCUST_THINK_S", "0.5,2").split(",")]
# the one shipping-address schema of POST /orders and POST /cart/checkout
ADDRESS = {"name": "Load Test", "phone": "13800000000", "address": "1 Bench Road, Y City"}


def _data(resp):
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("data") if isinstance(body, dict) else None


@events.init.add_listener
def _default_host(environment, **_kwargs):
    announce_host(environment)


class Browser(FastHttpUser):
    """A storefront shopper."""

    host = running_gateway()  # -H wins; without it, the gateway `flashsale up` runs
    weight = 10
    wait_time = between(THINK_S[0], THINK_S[-1])

    def on_start(self):
        self.auth = {"Authorization": f"Bearer {token_pool(self.environment).take()}"}
        self.product_ids = []
        self.sku_ids = []
        self.cart_item_ids = []
        self.unpaid = []

    def _remember(self, data):
        """Product ids from a listing (``data.products``)."""
        products = data.get("products") if isinstance(data, dict) else None
        for item in products if isinstance(products, list) else []:
            if isinstance(item, dict) and "id" in item:
                self.product_ids.append(item["id"])
        self.product_ids = self.product_ids[-50:]

    @task(40)
    def browse(self):
        resp = self.client.get(
            f"/api/v1/products?page={random.randint(1, 5)}&limit=20", name="/api/v1/products"
        )
        self._remember(_data(resp))

    @task(20)
    def search(self):
        resp = self.client.get(
            f"/api/v1/products?q={random.choice(SEARCH_TERMS)}", name="/api/v1/products?q="
        )
        self._remember(_data(resp))

    @task(20)
    def detail(self):
        if not self.product_ids:
            return self.browse()
        resp = self.client.get(
            f"/api/v1/products/{random.choice(self.product_ids)}", name="/api/v1/products/[id]"
        )
        data = _data(resp)
        if isinstance(data, dict):
            for sku in data.get("skus") or []:
                if isinstance(sku, dict) and "id" in sku and (sku.get("stock") or 0) > 0:
                    self.sku_ids.append(sku["id"])
            self.sku_ids = self.sku_ids[-20:]
        return None

    @task(8)
    def cart_add(self):
        if not self.sku_ids:
            return self.detail()
        with self.client.post(
            "/api/v1/cart/items",
            headers=self.auth,
            json={"sku_id": random.choice(self.sku_ids), "quantity": 1},
            name="/api/v1/cart/items",
            catch_response=True,
        ) as resp:
            if resp.status_code == 409:
                resp.success()
            data = _data(resp)
            if isinstance(data, dict) and data.get("cart_item_id"):
                self.cart_item_ids.append(data["cart_item_id"])
                self.cart_item_ids = sorted(set(self.cart_item_ids))[-20:]
        return None

    @task(4)
    def cart_update(self):
        if not self.cart_item_ids:
            return self.cart_add()
        with self.client.put(
            f"/api/v1/cart/items/{random.choice(self.cart_item_ids)}",
            headers=self.auth,
            json={"quantity": random.randint(1, 3)},
            name="/api/v1/cart/items/[id]",
            catch_response=True,
        ) as resp:
            if resp.status_code == 404:  # checked out by another user on this account
                resp.success()
                self.cart_item_ids.clear()
            elif resp.status_code == 409:
                resp.success()
        return None

    @task(5)
    def checkout(self):
        if not self.cart_item_ids:
            return self.cart_add()
        with self.client.post(
            "/api/v1/cart/checkout",
            headers=self.auth,
            json={"selected_items": self.cart_item_ids, "shipping_address": ADDRESS},
            name="/api/v1/cart/checkout",
            catch_response=True,
        ) as resp:
            if resp.status_code in (404, 409):
                resp.success()
                self.cart_item_ids.clear()  # start a new cart rather than retry a stale one
            data = _data(resp)
            if isinstance(data, dict) and data.get("order_id"):
                self.unpaid.append(data["order_id"])
                self.cart_item_ids.clear()
        return None

    @task(3)
    def pay(self):
        if not self.unpaid:
            return self.checkout()
        with self.client.post(
            f"/api/v1/orders/{self.unpaid.pop()}/pay",
            headers=self.auth,
            json={"payment_method": "alipay"},
            name="/api/v1/orders/[id]/pay",
            catch_response=True,
        ) as resp:
            if resp.status_code == 503 and "PAYMENT_PROVIDER_UNAVAILABLE" in (resp.text or ""):
                resp.failure(
                    "503 PAYMENT_PROVIDER_UNAVAILABLE: run the gateway with "
                    "FLASHSALE_PAYMENT_PROVIDER=sandbox"
                )
        return None
