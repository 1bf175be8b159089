"""residency on Ray Serve, end to end: two nodes, two model-server replicas, real and fake runners.

One cluster for the module (starting Ray costs ~15 s on the 2-core CI machine). Node A's budget
holds Gemma and the tiny GGUF, not `big`; node B's holds `big` and tiny2. Requests go through the
ingress (residency's own app, both APIs) and, where a test must see which replica served each
request, through the model-server deployment's handle (its answer names the replica).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

from estimate_models import write_llama
from llama_server_fixtures import require_llama_server
from ray_cluster import RayServe, replica_stats, two_node_serve, wait_for
from residency.config import load_settings
from residency.embedded import default_model_path
from residency.registry import Registry
from residency.scheduler.sizing import Sizing
from scheduler_helpers import FAKE_RUNNER, alive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MIB = 1 << 20
CHAT = [{"role": "user", "content": "Say hi."}]


def _fake(name: str, mem: int, *flags: str) -> str:
    args = ", ".join(
        f'"{a}"'
        for a in (FAKE_RUNNER, "--port", "{port}", "--name", "{name}", "--bytes", str(mem), *flags)
    )
    return f"""
[[models]]
name = "{name}"
path = "{FAKE_RUNNER}"
runner = "command"
memory = {mem}
ctx = 512
command = ["{sys.executable}", {args}]
"""


def _needs(config: Path) -> dict[str, int]:
    settings = load_settings(config)
    sizing = Sizing(settings)

    async def sized() -> dict[str, int]:
        out = {}
        for e in Registry.from_settings(settings).entries():
            out[e.name] = (await sizing.needed(e, sizing.options(e, None), False))[0]
        return out

    return asyncio.run(sized())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayServe, dict[str, int]]]:
    require_llama_server()
    tmp = tmp_path_factory.mktemp("ray")
    tiny = write_llama(tmp / "tiny.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    tiny2 = write_llama(tmp / "tiny2.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    config = tmp / "residency.toml"
    base = f"""
discover = false
host_cache_bytes = 0
default_ctx = 1024
[[models]]
name = "gemma"
path = "{default_model_path()}"
[[models]]
name = "tiny"
path = "{tiny}"
[[models]]
name = "tiny2"
path = "{tiny2}"
"""
    config.write_text(base)
    needs = _needs(config)
    big = needs["gemma"] + 64 * MIB
    huge = 4 * big  # larger than either node's budget
    config.write_text(
        base + _fake("big", big) + _fake("slow", 8 * MIB, "--request-s", "20") + _fake("huge", huge)
    )
    needs.update(big=big, slow=8 * MIB, huge=huge)
    spare = 24 * MIB
    node_settings = {
        "node_a": {"memory_limit": needs["gemma"] + needs["tiny"] + spare},
        "node_b": {"memory_limit": big + needs["tiny2"] + needs["slow"] + spare},
    }
    with two_node_serve(config, node_settings) as served:
        yield served, needs


def _via_handle(served: RayServe, model: str) -> dict[str, Any]:
    body = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
    _, info = (
        served.handle.options(multiplexed_model_id=model)
        .complete.remote("/v1/chat/completions", body)
        .result(timeout_s=120)
    )
    info_dict: dict[str, Any] = info
    return info_dict


def _replica_of(stats: dict[str, dict[str, Any]], node_budget_over: int) -> str:
    """The replica whose largest device budget exceeds `node_budget_over` bytes."""
    [rid] = [
        r for r, s in stats.items() if max(d["budget"] for d in s["devices"]) > node_budget_over
    ]
    return rid


def test_too_large_model_is_never_routed_to_the_small_replica(
    cluster: tuple[RayServe, dict[str, int]],
) -> None:
    served, needs = cluster
    stats = replica_stats(served.handle)
    node_b = _replica_of(stats, needs["big"])
    [node_a] = set(stats) - {node_b}
    assert "big" in stats[node_a]["cannot_fit"]  # what A reported, and what the router obeys
    assert "big" not in stats[node_b]["cannot_fit"]
    for _ in range(3):
        assert _via_handle(served, "big")["replica"] == node_b
    # Through the ingress too, and /api/ps shows it on B only.
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": "big", "messages": CHAT})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("reply from big")
    # The cluster view is the replicas' last stats (every STATS_PERIOD_S): it catches up.
    wait_for(lambda: served.holders("big") == {node_b}, 30, "big on node B in /api/ps")


def test_a_model_no_replica_can_fit_is_refused_without_reaching_one(
    cluster: tuple[RayServe, dict[str, int]],
) -> None:
    served, _ = cluster
    stats = replica_stats(served.handle)
    assert all("huge" in s["cannot_fit"] for s in stats.values())
    r = httpx.post(served.url + "/api/chat", json={"model": "huge", "messages": CHAT}, timeout=60)
    assert r.status_code == 500, r.text
    assert "fits on no replica" in r.json()["error"]
    assert not served.holders("huge")
    assert not _runner_pids("huge")


def test_requests_land_on_the_replica_that_holds_the_model(
    cluster: tuple[RayServe, dict[str, int]],
) -> None:
    served, _ = cluster
    first = {m: _via_handle(served, m) for m in ("gemma", "tiny", "tiny2")}
    # Each model is loaded on one replica; stats then show it there.
    wait_for(lambda: all(served.holders(m) == {first[m]["replica"]} for m in first), 30, "stats")
    for _ in range(2):
        for model, info in first.items():
            again = _via_handle(served, model)
            assert again["replica"] == info["replica"], model
            assert not again["cold"], model
    for model, info in first.items():
        assert served.holders(model) == {info["replica"]}
    # /v1/models says where each model is resident: device@replica/node.
    cards = {c["id"]: c for c in httpx.get(served.url + "/v1/models", timeout=30).json()["data"]}
    for model, info in first.items():
        [where] = cards[f"{model}:latest"]["resident_on"]
        assert where.startswith(f"host@{info['replica']}/")


def test_official_clients_against_the_ingress(cluster: tuple[RayServe, dict[str, int]]) -> None:
    import ollama
    import openai

    served, _ = cluster
    with openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=120) as oc:
        _openai_calls(oc)
    with ollama.Client(host=served.url, timeout=120) as client:
        _ollama_calls(client)


def _openai_calls(oc: Any) -> None:
    answer = oc.chat.completions.create(
        model="gemma",
        messages=CHAT,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    pieces = [
        c.choices[0].delta.content or ""
        for c in oc.chat.completions.create(
            model="gemma",
            messages=CHAT,
            max_tokens=8,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        if c.choices
    ]
    assert "".join(pieces).strip()
    done = oc.completions.create(model="tiny", prompt="Once upon", max_tokens=4, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    assert "gemma" in {m.id.split(":")[0] for m in oc.models.list()}
    embedded = oc.embeddings.create(model="big", input="a")  # the fake runner: one vector
    assert embedded.data[0].embedding == pytest.approx([0.1, 0.2, 0.3])


def _ollama_calls(client: Any) -> None:
    import ollama

    chat = client.chat(model="gemma", messages=CHAT, options={"temperature": 0, "num_predict": 8})
    assert chat.message.content
    streamed = list(
        client.generate(
            model="gemma", prompt="Hi", stream=True, options={"temperature": 0, "num_predict": 8}
        )
    )
    assert streamed[-1].done
    assert "".join(p.response for p in streamed).strip()
    vectors = client.embed(model="big", input="one").embeddings
    assert len(vectors) == 1
    assert vectors[0]
    loaded = client.generate(model="tiny2")  # no prompt: Ollama's load-only request
    assert loaded.done_reason == "load"
    ps = client.ps()
    assert any(m.model.startswith("gemma") for m in ps.models)
    # Errors keep their statuses through the hop: an unknown model is a 404.
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=CHAT)
    assert err.value.status_code == 404


def test_a_configuration_change_rolls_replicas_without_dropping_requests(
    cluster: tuple[RayServe, dict[str, int]],
) -> None:
    served, _ = cluster
    before = set(replica_stats(served.handle))
    statuses: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=served.url, timeout=120) as client:
            while not stop.is_set():
                for model in ("tiny", "big"):
                    r = client.post(
                        "/v1/chat/completions",
                        json={"model": model, "messages": CHAT, "max_tokens": 4, "temperature": 0},
                    )
                    statuses.append(r.status_code)
                    if r.status_code != 200:
                        failures.append(f"{model}: {r.status_code} {r.text[:300]}")

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_for(lambda: len(statuses) >= 4, 60, "traffic")
        bigger = {node: {"memory_limit": s["memory_limit"] + MIB} for node, s in
                  served.node_settings.items()}  # fmt: skip
        served.deploy(bigger)  # returns once the new replicas are running
        wait_for(lambda: not before & set(replica_stats(served.handle)), 120, "the roll")
        count = len(statuses)
        wait_for(lambda: len(statuses) >= count + 4, 60, "traffic after the roll")
    finally:
        stop.set()
        thread.join(timeout=120)
    assert statuses
    assert set(statuses) == {200}, failures


def _runner_pids(name: str) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(FAKE_RUNNER).encode() in cmd and name.encode() in cmd:
                pids.add(int(entry))
    return pids


def test_killed_replica_fails_in_flight_requests_and_is_restarted(
    cluster: tuple[RayServe, dict[str, int]],
) -> None:
    import ray

    served, _ = cluster
    result: dict[str, Any] = {}

    def in_flight() -> None:  # the slow runner answers after 20 s: still running when killed
        r = httpx.post(
            served.url + "/api/chat",
            json={"model": "slow", "messages": CHAT, "stream": False},
            timeout=120,
        )
        result["status"], result["body"] = r.status_code, r.text

    thread = threading.Thread(target=in_flight)
    thread.start()
    holder = wait_for(lambda: served.holders("slow"), 60, "slow to load")
    [replica] = holder
    pids = wait_for(lambda: _runner_pids("slow"), 30, "slow's runner")
    [name] = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(f"#{replica}")
    ]
    actor = ray.get_actor(name, namespace="serve")
    ray.kill(actor, no_restart=True)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert result["status"] == 502, result
    assert "replica" in result["body"]
    assert "died" in result["body"]
    # Its runner went with it (PR_SET_PDEATHSIG), and Serve starts a new replica.
    wait_for(lambda: not any(alive(p) for p in pids), 30, "the runner to exit")
    wait_for(
        lambda: len(s := replica_stats(served.handle)) == 2 and replica not in s, 120, "restart"
    )
    r = httpx.post(
        served.url + "/v1/chat/completions", json={"model": "tiny2", "messages": CHAT}, timeout=120
    )
    assert r.status_code == 200, r.text
