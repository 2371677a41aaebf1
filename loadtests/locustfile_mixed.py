"""Mixed: the stampede and the storefront at once, as during a real sale.

    python -m loadtests.mint --count 20000 --out tokens.txt
    LOCUST_TOKENS_FILE=tokens.txt LOCUST_SALE_ID=1 LOCUST_OUTCOMES=out/outcomes \\
      locust -f loadtests/locustfile_mixed.py --headless -u 5000 -r 1000 -t 60s \\
        --processes -1 -H http://127.0.0.1:8080 --csv out/mixed --html out/mixed.html
    python -m loadtests.invariants --sale-id 1 --accepted-file 'out/outcomes.*'

Both user classes draw from one sequence over the tokens file; by class weight 10 : 10 half
of the virtual users are shoppers of the sale (see locustfile_stampede.py for its
environment) and half browse the storefront (locustfile_storefront.py). Run a subset with
``locust ... Shopper`` or ``locust ... Browser``.

Tasks, by their names in Locust's statistics: the stampede's (GET /api/v1/flash-sales/[id],
POST /api/v1/flash-sales/[id]/join, GET /api/v1/orders/[id], POST /api/v1/orders/[id]/pay)
and the storefront's (GET /api/v1/products, GET /api/v1/products?q=,
GET /api/v1/products/[id], POST /api/v1/cart/items, PUT /api/v1/cart/items/[id],
POST /api/v1/cart/checkout, POST /api/v1/orders/[id]/pay).
"""

from __future__ import annotations

from loadtests.locustfile_stampede import Shopper
from loadtests.locustfile_storefront import Browser

__all__ = ["Browser", "Shopper"]
