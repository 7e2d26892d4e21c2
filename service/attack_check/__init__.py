"""The per-request robustness check behind ``POST /v1/models/{name}:attack``.

``check``: the request's parameters and their limits, 8-bit quantisation, and the attack itself
(PGD from the registry, an optional bisection for the smallest flipping eps), torch only;
``pool``: the bounded queue and the worker processes that run it away from the prediction path;
``worker``: the worker process (SCHED_IDLE, nice, its own torch threads, the model loaded once and
checked against the sha256 the server serves).
"""
