-- The back-office lists of every status read the status indexes once per status
-- (flashsale/orders/backoffice.py), so the indexes by date alone go: each was paid by
-- every flash order the consumer writes (orders 87 B and merchant_orders 95 B of WAL per
-- order, plus their page splits: `python -m loadtests.price_drain`), and read only by
-- an admin's or a merchant's first list page.
DROP INDEX orders_created_idx;
DROP INDEX merchant_orders_created_idx;
