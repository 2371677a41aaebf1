"""The waiting room of queued flash sales: entry, lottery, admission, join tokens, bot defence.

- ``config``: a sale's queue settings (per sale, over the ``FLASHSALE_QUEUE_*`` defaults).
- ``signing``: the HMAC tickets, join tokens and proof-of-work challenges, all checked
  in-process.
- ``room``: entering (lua/queue_enter.lua), the admitter step (lua/queue_admit.lua), and each
  worker's cached view of every queue that answers polls without any I/O.
"""
