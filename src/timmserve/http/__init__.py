"""Layer 3, the HTTP contract every engine serves: routes and the one error path (routes.py), the
bodies of `POST /predict` (payload.py), the Open Inference Protocol (oip.py), the middleware
(middleware.py), the request-head limits on uvicorn (protocol.py), OpenAPI (openapi.py), Prometheus
metrics (metrics.py) and the demo page (static/). An engine hands `routes.install` its classify
function; nothing here knows which engine runs."""
