"""Timing constants: periods, timeouts, backoffs and lifetimes, in one place.

What an operator sets per deployment is a setting (flashsale/settings.py,
docs/settings.md); what is here is fixed by the design, gathered so that the ones that
must agree with each other stand side by side and each says why it is what it is. A
constant that only shapes one loop's inner working stays beside that loop. Units are in
the names (``_S``, ``_MS``).
"""

from __future__ import annotations

from typing import Final

WEEK_S: Final = 7 * 24 * 3600

# --- stores -------------------------------------------------------------------------------

# Opening a connection to Redis or PostgreSQL (a pool reconnecting after a loss included): a
# store that does not accept within this long is down (asyncpg's own default waits 60 s).
CONNECT_TIMEOUT_S: Final = 5
# A PostgreSQL statement that runs longer is cancelled; the longest (reconcile, exports)
# take a few seconds on a large shop.
SQL_COMMAND_TIMEOUT_S: Final = 30
# A store answers a liveness probe (/readyz, the sweepers' "is PostgreSQL there") within
# this long, or counts as down: short, so a probe never queues behind a slow store.
PROBE_TIMEOUT_S: Final = 2.0
# The join path's pipelined Redis connection: a batch not answered within this long fails
# its joins with "outcome unknown" (Redis answers a batch in well under a millisecond).
REDIS_BATCH_TIMEOUT_S: Final = 5.0
# How often the join path re-reads how many replicas are connected (with
# FLASHSALE_REDIS_WAIT_REPLICAS): once a second is enough to notice a replica lost.
REPLICAS_EVERY_S: Final = 1.0
# A pub/sub follower (revocations, plans) that lost Redis subscribes again after this.
FOLLOW_RECONNECT_S: Final = 0.5
# A machine id is leased for LEASE_TTL_MS and renewed every RENEW_S: three renewals may
# fail before the lease lapses, and a dead process frees its id within half a minute.
MACHINE_LEASE_TTL_MS: Final = 30_000
MACHINE_LEASE_RENEW_S: Final = 10.0
# The join path's cluster batcher re-reads the slot map at most this often: a failover's
# burst of MOVED replies costs one round of CLUSTER SLOTS, not one per call redirected.
CLUSTER_SLOTS_REFRESH_MIN_S: Final = 0.05
# A node that does not answer CLUSTER SLOTS within this long is skipped for the next one.
CLUSTER_SLOTS_NODE_TIMEOUT_S: Final = 2.0
# A task that lost its cancellation inside a library is cancelled again this often, so a
# shutdown that waits for it cannot hang on it.
TASK_RECANCEL_EVERY_S: Final = 1.0

# --- flash sales ----------------------------------------------------------------------------

# Each worker re-reads its copy of every running sale this often (the join reads the copy).
SALE_CACHE_REFRESH_S: Final = 0.5
# A sale id Redis does not know is not asked again for this long (a stampede at a wrong id).
SALE_CACHE_MISS_S: Final = 1.0
# A transfer between two buckets older than this is the sweeper's to finish: far above a
# transfer's two round trips, so the sweeper never races the giver still finishing it.
TRANSFER_STALE_MS: Final = 2_000
# Reservations outlive the payment deadline a little, so that the order sweeper (which
# cancels the order and releases them) runs first and the reservation sweeper is only
# the backstop for orders that never got written.
RESERVATION_GRACE_S: Final = 300
# A waiting room's proof-of-work challenge is accepted this long after it was issued.
CHALLENGE_MAX_AGE_MS: Final = 300_000

# A queued sale that follows the measured accept rate (``queue.admit_per_s`` 0) measures it
# over this long: a few seconds of joins, so one burst does not set the pace for long.
QUEUE_ACCEPT_RATE_WINDOW_S: Final = 3.0

# --- shop ---------------------------------------------------------------------------------

# A guest cart expires this long after its last write.
GUEST_CART_TTL_S: Final = WEEK_S
# A product page's cached detail is at most this old (stock shown on it included).
PRODUCT_DETAIL_TTL_S: Final = 30
# catalog-from-cache: the last good copy of a catalog page. An outage is hours at worst, so
# a week-old copy is junk; a worker rewrites one page's copy at most every REFRESH_S.
CATALOG_COPY_TTL_S: Final = WEEK_S
CATALOG_COPY_REFRESH_S: Final = 5.0

# --- gateway ------------------------------------------------------------------------------

# An event stream (sale page, waiting room, dashboard) sends a comment this often when it
# has nothing to say, below the usual 30-60 s idle timeout of proxies on the way.
STREAM_KEEPALIVE_S: Final = 15.0
# Retry-After of a refused event stream: another stream of the same address ends within
# seconds when its page goes; a full worker's streams end at the latest after
# FLASHSALE_STREAM_MAX_S.
STREAM_ADDRESS_RETRY_S: Final = 30
STREAM_WORKER_RETRY_S: Final = 10
# How often an open dashboard stream checks its token again: a revoked or expired one ends
# it within a second, like the next request it would have made.
STREAM_REVALIDATE_S: Final = 0.5
# Request counters and sale gauges go to the metrics files once a second, Prometheus's
# finest scrape.
EXPORT_EVERY_S: Final = 1.0
# A sale's gauges stay this long past its end, so a dashboard sees how it finished.
GAUGE_GRACE_MS: Final = 10 * 60 * 1000

# A request a sale-day plan sheds (flashsale/plans.py) is told to retry after this long.
SHED_RETRY_AFTER_S: Final = 2
# Each worker probes every store this often (the flashsale_store_up gauge and the plans that
# follow the stores); the Redis and broker probes get at most the period, so they never pile
# up (PostgreSQL's has PROBE_TIMEOUT_S, as in /readyz).
STORE_PROBE_EVERY_S: Final = 1.0
STORE_PROBE_TIMEOUT_S: Final = 1.0
# A worker's CPU, which the storefront shedding plan compares, is measured over this long.
CPU_SAMPLE_S: Final = 1.0
# Access-log lines go out at the latest this long after the first one buffered: a worker
# killed outright loses at most this much of its log (nginx's ``access_log ... flush=``).
ACCESS_LOG_FLUSH_AFTER_S: Final = 0.05

# --- dashboard (flashsale/dashboard/) ---------------------------------------------------------

# Rates are the mean of the last DASH_RATE_WINDOW_S complete seconds (one second is noisy);
# join p50/p99 come from the last DASH_LATENCY_WINDOW_S (a single second is often empty), the
# seconds a snapshot reads; a process counts in a gauge while it published within
# DASH_GAUGE_FRESH_S. Both shorter windows lie inside the seconds read.
DASH_RATE_WINDOW_S: Final = 3
DASH_LATENCY_WINDOW_S: Final = 10
DASH_GAUGE_FRESH_S: Final = 5
# A second's hash outlives every reader of it (a snapshot reads the latency window back).
DASH_SECOND_TTL_S: Final = DASH_LATENCY_WINDOW_S + 50
# A process on its way out publishes once more, waiting this long at most.
DASH_LAST_PUBLISH_S: Final = 2.0
# The one process that wins a second's tick key computes its snapshot; the key outlives the
# second by far, and the snapshot outlives the readers that come for it.
DASH_TICK_TTL_S: Final = 10
DASH_SNAPSHOT_TTL_S: Final = 30
# A worker that lost the tick waits this long, at most this many times, for the winner's
# snapshot: within the second, before the next tick.
DASH_READ_RETRY_S: Final = 0.2
DASH_READ_RETRIES: Final = 4
# The history a dashboard opens with: the last five minutes of one-a-second snapshots.
DASH_HISTORY_S: Final = 300

# --- consumers ----------------------------------------------------------------------------

# The dashboard shows the last reconcile's drift (units and money) this long.
DRIFT_KEPT_S: Final = WEEK_S
# A batch that failed for a transient reason (a store lost) is retried after these waits,
# the last one repeating; a broker poll that failed is retried after POLL_RETRY_S.
BATCH_RETRY_BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0, 5.0)
POLL_RETRY_S: Final = 1.0
# The consumer touches its heartbeat file this often: well inside the 30 s after which
# docker-compose.yml's health check calls a consumer dead.
CONSUMER_HEARTBEAT_S: Final = 5.0

# A sale is recent this long after its end: the recovery sweeper, reconcile and the settle
# sweep look at it (`flashsale reconcile --help` and docs/operations.md say so).
RECENT_SALES_DAYS: Final = 7
# Recovery reads the order topic to its end within this long (the broker's answers within
# BROKER_REQUEST_TIMEOUT_MS), or gives up and tries again on its next pass.
RECOVERY_READ_TIMEOUT_S: Final = 20.0
BROKER_REQUEST_TIMEOUT_MS: Final = 5_000
# One recovery process recounts a split sale at a time: it holds the sale's lease this long,
# far above a recount's few round trips, so a recovery that died frees it within a minute.
REARM_LEASE_MS: Final = 60_000
# `flashsale rebuild-cache` looks this often whether another recovery re-armed what it skipped.
REBUILD_POLL_S: Final = 0.2
# The store sweeper, told to stop, lets its pass finish this long before cancelling it.
STORE_SWEEP_STOP_GRACE_S: Final = 5.0

# --- stack --------------------------------------------------------------------------------

# A child of `flashsale up` that dies is restarted after these waits (by how many deaths
# in the crash-loop window), the last one repeating; CRASH_LOOP_DEATHS deaths within
# CRASH_LOOP_WINDOW_S stop the stack with the reason.
RESTART_BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0, 5.0)
CRASH_LOOP_WINDOW_S: Final = 60.0
# Preflight: long enough for a loaded server on the far side of a network, short enough
# that a port that accepts and never answers stops the start at once.
PREFLIGHT_ANSWER_TIMEOUT_S: Final = 3.0
# Out of file descriptors: a worker's listening socket accepting again at once would spin on
# the same error; asyncio waits a second too (``asyncio.constants.ACCEPT_RETRY_DELAY``).
ACCEPT_RETRY_DELAY_S: Final = 1.0
