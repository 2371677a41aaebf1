"""Hosts that lose each other, on one machine.

``hosts``: network namespaces over one bridge, and the faults (cut, sever, split, heal);
``stack``: the service spread over those hosts (valkey cluster, broker, PostgreSQL, two
gateways, a consumer); ``history``: shoppers that record every answer, and the checker.
"""
