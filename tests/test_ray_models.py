"""Scale-out by model on Ray Serve (issue 30): two replicas, three models, a budget per replica that holds two.

The proxy's half (``deploy/routing.py``: the ``serve_multiplexed_model_id`` header from the request's body) is tested
on plain ASGI apps standing in for Ray's proxy; the whole on one real local Ray cluster for the module (``python
deploy/ray_serve.py``, tests/ray_helpers.py), serving tests/model_dirs.py's family: each model gives a lone server's
image for the same seed, requests for a model are answered by replicas that hold it (each replica's /api/status:
no load happens once warm), and a burst across the three all succeeds. Skipped, saying why, where ray[serve] is not
installed or Ray cannot start here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer, wait_ready
from http_helpers import NATIVE, fetch_png, pixels
from model_dirs import FAMILY, save_family

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -r requirements-ray.txt")

from ray_helpers import ServeProcess  # noqa: E402

from deploy.ray_serve import REPLICA_HEADER, Scale, build_app  # noqa: E402
from deploy.routing import MODEL_HEADER, SCAN_LIMIT, ModelRoutes, ModelRouting, model_routes  # noqa: E402

ROUTES = ModelRoutes(["large", "medium", "other"], "large", adapters={"medium": ["ink"]})
BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "seed": 11, "width": 64, "height": 64}
REQUEST_TIMEOUT = 120.0


# -- the proxy's half, on plain ASGI apps --------------------------------------------------------------------------


def _routed(routes: ModelRoutes | None = ROUTES, method: str = "POST", **request: Any) -> tuple[str | None, bytes]:
    """The model header the app behind ``ModelRouting`` saw, and the body it read."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [v.decode() for k, v in scope["headers"] if k in (MODEL_HEADER, MODEL_HEADER.replace(b"_", b"-"))]
        seen.update(headers=headers, body=body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def go() -> None:
        transport = httpx.ASGITransport(app=ModelRouting(app, routes))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            await client.request(method, NATIVE, **request)

    asyncio.run(go())
    assert len(seen["headers"]) <= 1, seen["headers"]
    return (seen["headers"] or [None])[0], seen["body"]


def test_the_header_names_the_model_the_server_would_serve() -> None:
    assert _routed(json={"prompt": "a", "model": "other"})[0] == "other"
    assert _routed(json={"prompt": "a", "model": "dall-e-3"})[0] == "large"  # unknown: the default, as the server
    assert _routed(json={"prompt": "a"})[0] == "large"  # none named: the default
    assert _routed(json={"prompt": "a", "model": "ink"})[0] == "medium"  # an adapter: its base model
    a1111 = {"prompt": "a", "override_settings": {"sd_model_checkpoint": "other.safetensors [0badc0de]"}}
    assert _routed(json=a1111)[0] == "other"
    strict = ModelRoutes(ROUTES.models, "large", strict=True)
    assert _routed(strict, json={"prompt": "a", "model": "dall-e-3"})[0] is None  # the replica answers 404
    assert _routed(method="GET")[0] is None  # no body, no model: any replica
    assert _routed(None, json={"model": "other"})[0] is None  # no routes: passes unchanged (one model)


def test_a_clients_own_header_is_replaced_and_the_body_goes_on_unchanged() -> None:
    body = json.dumps({"prompt": "a" * 5000, "model": "medium"}).encode()
    model, seen = _routed(content=body, headers={"serve_multiplexed_model_id": "other", "content-type": "x/json"})
    assert (model, seen) == ("medium", body)
    assert _routed(method="GET", headers={"serve-multiplexed-model-id": "other"})[0] is None
    huge = json.dumps({"model": "other", "prompt": "a" * (SCAN_LIMIT + 10)}).encode()
    assert _routed(content=huge) == (None, huge)  # too long to say: any replica, the body whole


def test_a_multipart_forms_model_field_routes_it() -> None:
    image = b"\x89PNG" + bytes(range(256)) * 64
    files = {"image": ("in.png", image, "image/png")}
    assert _routed(data={"prompt": "a", "model": "other"}, files=files)[0] == "other"
    assert _routed(data={"prompt": "a"}, files=files)[0] == "large"
    model, seen = _routed(files={"image": ("in.png", image, "image/png")}, data={"model": "medium"})
    assert model == "medium" and image in seen


def test_routes_come_from_the_settings_of_several_models_only(tmp_path: Path) -> None:
    from api import Settings

    assert model_routes(Settings(model=["random:tiny"])) is None
    several = Settings(model=["a=random:tiny", "b=random:tiny"], strict_model_names=True)
    routes = model_routes(several)
    assert routes == ModelRoutes(["a", "b"], "a", strict=True, adapters={})
    assert ModelRoutes.from_json(routes.to_json()) == routes


def test_models_per_replica_is_a_scale_option() -> None:
    assert Scale(models_per_replica=2).models_per_replica == 2
    with pytest.raises(ValueError, match="models_per_replica"):
        build_app({"model": "random:tiny", "models_per_replica": "-1"})


def test_when_rays_lru_drops_a_model_the_replica_unloads_it_if_idle() -> None:
    """Ray's own unload code (``_ModelMultiplexWrapper.unload_model_lru``, run on a stand-in for its wrapper: its
    metrics are no-ops) on the tokens ``ReplicaModels`` hands Ray: the model leaves the replica's set, unless a
    request holds it."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from ray.serve.multiplex import _ModelMultiplexWrapper

    from deploy.multiplex import ReplicaModels
    from registry import parse_model_options
    from registry.models import ModelSet

    class Quiet:
        def __getattr__(self, _name: str) -> Any:
            return lambda *args, **kwargs: None

    async def run() -> dict[str, str]:
        models = ModelSet(parse_model_options(["a=random:tiny", "b=random:tiny"]), budget=1 << 40)
        replica = ReplicaModels(SimpleNamespace(state=SimpleNamespace(modelset=models)), per_replica=1)
        ray = SimpleNamespace(models=OrderedDict(), models_unload_counter=Quiet(), model_unload_latency_ms=Quiet())
        ray.registered_model_gauge = Quiet()
        for name in ("a", "b"):
            ray.models[name] = await replica._load(name)
        held = await models.acquire("b")
        await _ModelMultiplexWrapper.unload_model_lru(ray)  # drops a: idle, unloaded
        await _ModelMultiplexWrapper.unload_model_lru(ray)  # drops b: in flight, stays
        states = {name: m["state"] for name, m in models.status()["models"].items()}
        models.release(held)
        await models.stop()
        return states

    assert asyncio.run(run()) == {"a": "unloaded", "b": "resident"}


# -- two replicas, three models, on a real local Ray cluster --------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_family(tmp_path_factory.mktemp("family"))


def _two_of_three(family: dict[str, Path]) -> int:
    """A budget that holds any two of the three models (large and medium share their encoders), never all three:
    each model's bytes measured through a ModelSet, as a replica's."""
    from registry import apply_flags, parse_model_options
    from registry.models import ModelSet

    async def measure() -> dict[str, Any]:
        specs = apply_flags(parse_model_options([f"{name}={path}" for name, path in family.items()]))
        models = ModelSet(specs, budget=1 << 40)
        for name in family:
            models.release(await models.acquire(name))
        status = models.status()
        await models.stop()
        return status

    status = asyncio.run(measure())
    alone = {name: s["bytes_alone"] + s["bytes_shared"] for name, s in status["models"].items()}
    budget = alone["large"] + alone["other"] + status["models"]["medium"]["bytes_alone"] // 2
    assert max(alone.values()) * 2 <= budget < status["used"], (alone, status["used"])
    return budget


@pytest.fixture(scope="module")
def served(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    budget = _two_of_three(family)
    models = tuple(f"{name}={family[name]}" for name in FAMILY)
    flags = ("--memory-budget", str(budget), "--memory-admission", "off", "--models-per-replica", "2")
    server = ServeProcess(tmp_path_factory.mktemp("ray-models"), 12, models=models, extra=flags)
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


def _post(url: str, model: str, **body: Any) -> httpx.Response:
    answer = httpx.post(url + NATIVE, json={**BODY, "model": model, **body}, timeout=REQUEST_TIMEOUT)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["parameters"]["model"] == model
    return answer


def _replica_models(url: str) -> dict[str, dict[str, Any]]:
    """Each replica's models (its /api/status, through the proxy until both replicas answered; bounded)."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        response = httpx.get(f"{url}/api/status", timeout=30)
        assert response.status_code == 200, response.text[:300]
        seen[response.headers[REPLICA_HEADER]] = response.json()["models"]["models"]
    assert len(seen) == 2, "only one replica answered /api/status"
    return seen


def _loads(replicas: dict[str, dict[str, Any]]) -> int:
    return sum(model["loads"] for models in replicas.values() for model in models.values())


def _resident(models: dict[str, Any]) -> set[str]:
    return {name for name, model in models.items() if model["state"] == "resident"}


@pytest.mark.slow
def test_each_model_gives_the_image_of_a_lone_server_of_it(
    served: ServeProcess, family: dict[str, Path], tmp_path: Path
) -> None:
    from serverasync import Settings, create_app

    for name in FAMILY:
        through_ray = pixels(fetch_png(_post(served.url, name).json()["response"][0]))
        # The replicas' slots: 2 on a CPU, each with one thread (Ray's OMP_NUM_THREADS or the two cores split).
        folder = tmp_path / name
        folder.mkdir()
        settings = Settings(model=[str(family[name])], data_dir=str(folder), image_dir=str(folder / "images"))
        alone = LiveServer(create_app(settings.model_copy(update={"max_concurrency": 2})))
        try:
            wait_ready(alone.url)
            answer = httpx.post(alone.url + NATIVE, json=BODY, timeout=REQUEST_TIMEOUT)
            assert answer.status_code == 200, answer.text[:300]
            assert through_ray == pixels(fetch_png(answer.json()["response"][0])), name
        finally:
            alone.stop()


@pytest.mark.slow
def test_requests_for_a_model_go_to_the_replicas_that_hold_it(served: ServeProcess) -> None:
    # Warm-up: rounds of every model until one round loads nothing anywhere (Ray learns which replica holds what
    # within a fraction of a second of each load). Without the routing a request lands on either replica, and a
    # round of 3 x 3 requests very rarely loads nothing.
    for _ in range(8):
        before = _loads(_replica_models(served.url))
        for name in FAMILY * 3:
            _post(served.url, name)
        time.sleep(1.0)
        if _loads(_replica_models(served.url)) == before:
            break
    else:
        pytest.fail("every round of requests still loaded a model somewhere: requests do not follow their models")
    before = _replica_models(served.url)
    answered = [
        (name, _post(served.url, name, seed=seed).headers[REPLICA_HEADER]) for seed in (1, 2, 3, 4) for name in FAMILY
    ]
    after = _replica_models(served.url)
    assert _loads(after) == _loads(before), (before, after)  # nothing was loaded: each went where its model was
    for name, replica in answered:
        assert name in _resident(after[replica]), (name, replica, after)
    assert all(len(_resident(models)) <= 2 for models in after.values()), after  # the budget holds two
    assert set().union(*(_resident(models) for models in after.values())) == set(FAMILY), after


@pytest.mark.slow
def test_a_burst_across_the_three_models_all_succeeds(served: ServeProcess) -> None:
    bodies = [(name, seed) for seed in range(4) for name in FAMILY]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda item: _post(served.url, item[0], seed=item[1]), bodies))
    assert len(answers) == 12  # each checked by _post: 200, and the model that was asked for
    assert len({a.headers[REPLICA_HEADER] for a in answers}) == 2
