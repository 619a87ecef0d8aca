"""Metering (docs/reference.md §13): what each request through the gateway cost, the limits and budgets that
hold it, and the ledger that records it.

Fed by the gateway (a `Record` per answered request, reservations before a request is sent),
read by `http` (`/usage`, `/limits`) and `cli` (`switchboard usage`). It sits below the gateway
and above the journal: it knows the configuration's models, never the HTTP layer.
"""
