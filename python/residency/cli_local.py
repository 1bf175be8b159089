"""``residency list --local``: the models this machine would serve, found without a server —
with where each comes from and every duplicate name a higher source shadowed."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from residency.cli_client import human_bytes, table

__all__ = ["cmd_list_local"]


def cmd_list_local(args: argparse.Namespace, out: TextIO) -> int:
    from residency.catalog import DiscoveredModels
    from residency.config import load_settings
    from residency.registry import make_entry

    settings = load_settings(args.config)
    found = DiscoveredModels(settings, make_entry)  # not watched: one look
    entries = sorted(found.entries(), key=lambda e: e.name)
    if args.json:
        data = {
            "models": [
                {
                    "name": e.name,
                    "digest": e.digest,
                    "size": e.size_bytes,
                    "path": str(e.path),
                    "source": found.sources.get(e.name, ""),
                }
                for e in entries
            ],
            "shadowed": [
                {"name": name, "used": used, "shadowed": other}
                for name, used, other in found.shadowed
            ],
        }
        json.dump(data, out, indent=2)
        out.write("\n")
        return 0
    rows = [["NAME", "ID", "SIZE", "SOURCE"]]
    for e in entries:
        source = found.sources.get(e.name, "")
        rows.append([e.name, e.digest[:12], human_bytes(e.size_bytes), source])
    table(rows, out)
    if found.shadowed:
        out.write("\nShadowed (the source above wins):\n")
        for name, used, other in found.shadowed:
            out.write(f"  {name}: {other} (using {used})\n")
    return 0
