"""The LitServe engine: the supervisor and its drain (server.py), each API server's data plane
(frontend.py) with its admission slots (admission.py) and inline lane (inline.py), the transport to
the inference workers (transport.py), the workers (worker.py) with their batcher (batching.py) and
batch step (inference.py), and every private piece of LitServe it touches (internals.py)."""
