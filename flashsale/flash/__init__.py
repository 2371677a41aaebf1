"""Flash sales, one job per module: ``join`` (the reservation script call, the order event,
compensation, refusals), ``lifecycle`` (create, top up, close, settle, load into Redis),
``buckets`` (a sale split over Redis Cluster slots), ``cache`` (each worker's copy of the
live sales), ``events`` (the order event and the reservation log's entries), ``views``
(flash orders still in flight, as the order routes show them), ``shipping`` (what a new
order needs to be shipped), ``runtime`` (the stores a worker joins with), ``recount`` (a
fenced sale's counters recomputed from its sources; the sweeper in
``consumers/recovery.py`` reads them).

The words, as the code and ``lua/*.lua`` use them:

- **allotment**: the units carved from the SKU for the sale (``flash_sales.quantity``;
  the ``allotment`` field of each bucket, its share). It only grows (a top-up).
- **remaining**: the units still free to reserve in Redis (the ``remaining`` field);
  ``lua/reserve.lua`` takes from it, nothing else decides a join.
- **the log**: the reservation log, a hash per bucket of order id → entry (user,
  quantity, deadline), written by the same script call that takes the units, with the
  time of each entry beside it. An entry is a reservation whose order is not yet in
  PostgreSQL.
- **claims**: entries a consumer moved out of the log before writing their orders
  (``lua/claim.lua``), so that a late compensation cannot release units being persisted;
  a claim left long after is republished by the sweeper.
- **in flight**: the reservations in the log or the claims: promised, not yet persisted.
- **moved out**: units that left the sale for good and go back to the SKU (released,
  returned or unsold at close; the ``moved_out`` field). Every unit of the allotment is in
  one place: remaining, in transit, in flight, a persisted live order, a cancelled order
  not yet returned, or moved out (``consumers/reconcile.py`` checks the sum).
- **bucket**: one of the N parts of a sale split over Redis Cluster slots (``buckets``):
  each holds its share of the allotment, its shoppers' counts, log and claims. A sale of
  one bucket is the common case. The word means this and nothing else in this package;
  beside it, only a rate limit's token bucket keeps the name (the dashboard's latency
  histogram has bins, and publishes into one hash per second).
- **in transit**: units one bucket gave another and that are not yet credited (the
  giver's transfer log); ``moves`` counts a bucket's gives and takes, so a reader can
  tell that none was in transit while it looked.
- **fence**: the token a recount (``consumers/recovery.py``) writes on every bucket of
  a sale before its snapshot; a bucket whose fence changed belongs to another recount.
- **epoch**: the fence token a recount re-armed the buckets under; a transfer of an
  older epoch is never credited (the recount counted its units).
- **armed**: the run id of the Redis server the live counters were written under; a
  join is refused (``SALE_RECOVERING``) where it is not the server's own.
"""
