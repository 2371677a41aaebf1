"""Storefront mix: browse, search, product detail, cart add/update, checkout, pay.

Headless, from the repo root, with the gateway up and a catalog loaded:

    python -m loadtests.mint --count 5000 --out tokens.txt
    LOCUST_TOKENS_FILE=tokens.txt \\
      locust -f loadtests/locustfile_storefront.py --headless -u 500 -r 100 -t 60s \\
        --processes -1 -H http://127.0.0.1:8080 --csv out/storefront --html out/storefront.html

Task weights (of 100):  browse 40 (GET /products?page=), search 20 (GET /products?q=),
product detail 20 (GET /products/{id}), cart add 8 (POST /cart/items), cart update 4
(PUT /cart/items/{id}), checkout 5 (POST /cart/checkout), pay 3 (POST /orders/{id}/pay).
Think time 0.5-2 s. A shopper pays only orders it created. The request shapes follow
issue 4 (storefront); 409s on checkout (stock, price changed) are expected answers.

Environment: LOCUST_TOKENS_FILE (required), LOCUST_SEARCH_TERMS (comma-separated).
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, events, task

from loadtests.scenario_support import TokenPool, env_str

SEARCH_TERMS = env_str("LOCUST_SEARCH_TERMS", "phone,shoe,coffee,laptop,bag").split(",")
ADDRESS = {
    "name": "Load Test",
    "phone": "13800000000",
    "province": "X",
    "city": "Y",
    "district": "Z",
    "detail": "1 Bench Road",
}
_pool = None


@events.init.add_listener
def _tokens(environment, **_kwargs):
    global _pool
    index = getattr(environment.runner, "worker_index", 0) or 0
    processes = getattr(environment.parsed_options, "processes", None) or 1
    stride = os.cpu_count() or 1 if processes == -1 else max(1, processes)
    _pool = TokenPool(env_str("LOCUST_TOKENS_FILE"), index % stride, stride)


def _data(resp):
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("data") if isinstance(body, dict) else None


class Browser(FastHttpUser):
    """A storefront shopper."""

    weight = 10
    wait_time = between(0.5, 2.0)

    def on_start(self):
        self.auth = {"Authorization": f"Bearer {_pool.take()}"}
        self.product_ids = []
        self.sku_ids = []
        self.cart_item_ids = []
        self.unpaid = []

    def _remember(self, data):
        items = data.get("items", []) if isinstance(data, dict) else data or []
        for item in items if isinstance(items, list) else []:
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
                if isinstance(sku, dict) and "id" in sku:
                    self.sku_ids.append(sku["id"])
            self.sku_ids = self.sku_ids[-20:]
        return None

    @task(8)
    def cart_add(self):
        if not self.sku_ids:
            return self.detail()
        resp = self.client.post(
            "/api/v1/cart/items",
            headers=self.auth,
            json={"sku_id": random.choice(self.sku_ids), "quantity": 1},
            name="/api/v1/cart/items",
        )
        data = _data(resp)
        if isinstance(data, dict) and "id" in data:
            self.cart_item_ids.append(data["id"])
        return None

    @task(4)
    def cart_update(self):
        if not self.cart_item_ids:
            return self.cart_add()
        self.client.put(
            f"/api/v1/cart/items/{random.choice(self.cart_item_ids)}",
            headers=self.auth,
            json={"quantity": random.randint(1, 3)},
            name="/api/v1/cart/items/[id]",
        )
        return None

    @task(5)
    def checkout(self):
        if not self.cart_item_ids:
            return self.cart_add()
        with self.client.post(
            "/api/v1/cart/checkout",
            headers=self.auth,
            json={"shipping_address": ADDRESS},
            name="/api/v1/cart/checkout",
            catch_response=True,
        ) as resp:
            if resp.status_code == 409:
                resp.success()
            data = _data(resp)
            if isinstance(data, dict) and data.get("order_id"):
                self.unpaid.append(data["order_id"])
                self.cart_item_ids.clear()
        return None

    @task(3)
    def pay(self):
        if not self.unpaid:
            return self.checkout()
        self.client.post(
            f"/api/v1/orders/{self.unpaid.pop()}/pay",
            headers=self.auth,
            json={"payment_method": "alipay"},
            name="/api/v1/orders/[id]/pay",
        )
        return None
