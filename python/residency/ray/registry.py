"""The request routers living in this process, by deployment name.

Ray Serve ships a custom router class by value (cloudpickle), so a router's own module globals
are a private copy; it registers itself here instead, in the module this process imported, where
the ingress (residency.ray.remote) finds it to show the router's view in /api/ps. Process-wide
on purpose: Serve creates the routers, nothing here can hand them to the ingress otherwise.
"""

from __future__ import annotations

from typing import Any

#: Deployment name → its router (residency.ray.router.ResidencyRouter) in this process.
ROUTERS: dict[str, Any] = {}
