"""``erc serve`` past one event loop: N HTTP processes feeding one model process (per device) that
batches across all of them. The layout, the wire format and the faults it survives are in
docs/architecture.md ("Serving processes"); the modules:

- :mod:`service.multiproc.supervisor`: starts, watches and restarts the processes; drains on SIGTERM;
- :mod:`service.multiproc.model_process`: the models, their batchers, the model repository's reconciler;
- :mod:`service.multiproc.http_process`: the FastAPI service on a shared port;
- :mod:`service.multiproc.remote`: the HTTP side of the connection (registry, batcher, reconciler);
- :mod:`service.multiproc.protocol`: the frames between them.
"""
