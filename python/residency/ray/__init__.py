"""residency on Ray Serve: replicas that each embed residency, routed to the one holding the model.

``pip install "residency[ray]"``. The pieces:

- :mod:`residency.ray.model_server` — the model-server deployment: one scheduler per replica.
- :mod:`residency.ray.router` — the request router that ranks replicas by what they hold.
- :mod:`residency.ray.remote` — the ingress's scheduler: the API pipeline's seam, over Serve.
- :mod:`residency.ray.app` — the Serve application (``build``, ``app_builder`` for ``serve run``).

Importing this package needs nothing beyond residency (:mod:`residency.ray.stats`, the routing
policy, is pure); the other modules need Ray Serve.
"""
