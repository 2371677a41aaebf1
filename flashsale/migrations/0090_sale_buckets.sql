-- One hot sale split into buckets on different Redis Cluster slots (issue "Beyond one
-- machine"; flashsale/flash/buckets.py). Chosen at create, never changed: every process
-- derives a shopper's home bucket from it.
ALTER TABLE flash_sales
    ADD COLUMN buckets smallint NOT NULL DEFAULT 1
        CONSTRAINT flash_sales_buckets_range CHECK (buckets BETWEEN 1 AND 64);
