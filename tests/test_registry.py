"""registry/: model specs, memory amounts, components judged by content, and ModelSet's residency, through real loads
of tests/model_dirs.py's family (``large`` and ``medium`` share their encoders' and VAE's files, ``other`` shares
nothing)."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from model_dirs import ENCODERS_AND_VAE, FAMILY, save_family

from models.options import LoadOptions
from registry import apply_flags, parse_memory, parse_model_options, read_models_file
from registry.components import ComponentCache, FileDigests, Part
from registry.loader import load_model
from registry.models import ModelLoadFailed, ModelSet, ModelsRefused, ModelTooLarge
from registry.residency import choose_victims, device_bytes

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_family(tmp_path_factory.mktemp("family"))


def specs_of(family: dict[str, Path], pin: tuple[str, ...] = ()) -> list:
    return apply_flags(parse_model_options([f"{name}={path}" for name, path in family.items()]), pin=pin)


@pytest.fixture(scope="module")
def sizes(family: dict[str, Path]) -> dict[str, int]:
    """Each model's measured bytes alone, and what large and medium share."""

    async def measure() -> dict[str, int]:
        models = ModelSet(specs_of(family), budget=1 << 40)
        for name in family:
            models.release(await models.acquire(name))
        status = models.status()["models"]
        await models.stop()
        alone = {name: s["bytes_alone"] + s["bytes_shared"] for name, s in status.items()}
        return {**alone, "shared": status["large"]["bytes_shared"]}

    return asyncio.run(measure())


def two_of_three(sizes: dict[str, int]) -> int:
    """A budget that holds large and medium together (they share), or any one with other, never all three."""
    budget = sizes["large"] + sizes["other"] + 1000
    assert budget < sizes["large"] + sizes["medium"] + sizes["other"] - sizes["shared"]
    return budget


def states(models: ModelSet) -> dict[str, str]:
    return {name: s["state"] for name, s in models.status()["models"].items()}


# -- specs and amounts ---------------------------------------------------------------------------------------


def test_model_options_name_source_or_a_bare_source() -> None:
    (one,) = parse_model_options(["random:tiny"])
    assert (one.name, one.source, one.default) == ("random:tiny", "random:tiny", True)
    specs = parse_model_options(["large=stabilityai/x", "/models/a=b", "./c=d", "medium=/m"])
    assert [(s.name, s.source) for s in specs] == [
        ("large", "stabilityai/x"),
        ("/models/a=b", "/models/a=b"),
        ("./c=d", "./c=d"),
        ("medium", "/m"),
    ]
    assert [s.default for s in specs] == [True, False, False, False]
    with pytest.raises(ValueError, match="given twice"):
        parse_model_options(["a=x", "a=y"])
    with pytest.raises(ValueError, match="no source"):
        parse_model_options(["a="])
    marked = apply_flags(specs, default="medium", preload=["large"], pin=["medium"])
    assert [(s.name, s.default, s.preload, s.pinned) for s in marked if s.name in ("large", "medium")] == [
        ("large", False, True, False),
        ("medium", True, False, True),
    ]
    with pytest.raises(ValueError, match="--pin nope: no such model"):
        apply_flags(specs, pin=["nope"])


def test_models_file_and_its_errors_name_the_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[model]]\nname = "a"\nsource = "random:tiny"\n\n[[model]]\nname = "b"\nsource = "/m"\n'
        "default = true\npin = true\n"
    )
    a, b = read_models_file(path)
    assert (a.default, b.default, b.pinned, b.source) == (False, True, True, "/m")
    path.write_text('[[model]]\nname = "a"\nsource = "x"\n\n[[model]]\nname = "b"\npin = "yes"\nsource = "y"\n')
    with pytest.raises(ValueError, match=r"models.toml:5: model #2: field 'pin' must be a bool"):
        read_models_file(path)
    path.write_text('[[model]]\nname = "a b"\nsource = "x"\n')
    with pytest.raises(ValueError, match=r":1: model #1: field 'name' 'a b' is not a model name"):
        read_models_file(path)
    path.write_text('[[model]]\nname = "a"\n')
    with pytest.raises(ValueError, match="field 'source' is missing"):
        read_models_file(path)
    path.write_text("[[model]\n")
    with pytest.raises(ValueError, match=r"not valid TOML.*line 1"):
        read_models_file(path)


def test_memory_amounts() -> None:
    total = 10 * 1024**3
    assert parse_memory("6GB", total) == 6 * 10**9
    assert parse_memory("500MB", total) == 500 * 10**6
    assert parse_memory("1.5GiB", total) == 3 * 1024**3 // 2
    assert parse_memory("1073741824", total) == 1024**3
    assert parse_memory("0.8", total) == int(0.8 * total)
    assert parse_memory("25%", total) == total // 4
    for wrong, says in (("1.5", "between 0 and 1"), ("6 parsecs", "unknown unit"), ("lots", "not an amount")):
        with pytest.raises(ValueError, match=says):
            parse_memory(wrong, total)


# -- components by content ------------------------------------------------------------------------------------


def test_identical_files_are_one_object_wherever_they_are_and_one_changed_byte_is_another(
    family: dict[str, Path], tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(family["large"], copy)
    changed = tmp_path / "changed"
    shutil.copytree(family["large"], changed)
    weights = changed / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the header stays valid
    weights.write_bytes(bytes(data))

    cache, digests = ComponentCache(), FileDigests(tmp_path / "digests")
    cpu = torch.device("cpu")
    load = {
        n: load_model(s, LoadOptions(), cpu, torch.float32, cache, digests).pipeline
        for n, s in (
            ("large", *specs_of({"large": family["large"]})),
            ("copy", *parse_model_options([f"copy={copy}"])),
            ("changed", *parse_model_options([f"changed={changed}"])),
        )
    }
    for component in ("transformer", *ENCODERS_AND_VAE):
        assert getattr(load["copy"], component) is getattr(load["large"], component), component
    assert load["changed"].vae is not load["large"].vae
    assert load["changed"].transformer is load["large"].transformer
    assert load["copy"].tokenizer is not load["large"].tokenizer  # tokenizers and scheduler are each model's own
    assert load["copy"].scheduler is not load["large"].scheduler
    # A restart reads the digests back: nothing is hashed again.
    again = FileDigests(tmp_path / "digests")
    load_model(*parse_model_options([f"copy={copy}"]), LoadOptions(), cpu, torch.float32, ComponentCache(), again)
    assert digests.hashed > 0 and again.hashed == 0


def test_random_presets_share_by_their_weights() -> None:
    cache = ComponentCache()
    cpu = torch.device("cpu")
    a, b = (
        load_model(s, LoadOptions(), cpu, torch.float32, cache).pipeline
        for s in parse_model_options(["a=random:tiny", "b=random:tiny"])
    )
    assert a.transformer is b.transformer and a.text_encoder_3 is b.text_encoder_3
    assert {e.holders.__len__() for e in cache.entries()} == {2}
    cache.release("a")
    assert len(cache) == 5 and all(e.holders == {"b"} for e in cache.entries())


# -- the set ------------------------------------------------------------------------------------------------


def test_sharing_models_hold_their_shared_components_once(family: dict[str, Path]) -> None:
    async def run() -> None:
        models = ModelSet(specs_of(family), budget=1 << 40)
        await models.start()
        large, medium, other = [await models.acquire(n) for n in ("large", "medium", "other")]
        for component in ENCODERS_AND_VAE:
            assert getattr(large.loaded.pipeline, component) is getattr(medium.loaded.pipeline, component)
            assert getattr(other.loaded.pipeline, component) is not getattr(large.loaded.pipeline, component)
        assert large.loaded.pipeline.transformer is not medium.loaded.pipeline.transformer
        status = models.status()
        assert sorted(len(c["models"]) for c in status["shared_components"]) == [2, 2, 2, 2]
        assert {tuple(c["models"]) for c in status["shared_components"]} == {("large", "medium")}
        assert status["models"]["other"]["bytes_shared"] == 0
        shared = status["models"]["large"]["bytes_shared"]
        alone = {n: s["bytes_alone"] + s["bytes_shared"] for n, s in status["models"].items()}
        assert status["used"] == sum(alone.values()) - shared
        for r in (large, medium, other):
            models.release(r)
        await models.stop()

    asyncio.run(run())


def test_the_least_recently_used_idle_model_is_evicted(family: dict[str, Path], sizes: dict[str, int]) -> None:
    async def run() -> None:
        models = ModelSet(specs_of(family), budget=two_of_three(sizes))
        await models.start()
        for name in ("medium", "large"):  # large, shared with medium, fits beside it
            models.release(await models.acquire(name))
        assert states(models) == {"large": "resident", "medium": "resident", "other": "unloaded"}
        models.release(await models.acquire("other"))  # medium is the least recently used
        assert states(models) == {"large": "resident", "medium": "unloaded", "other": "resident"}
        assert models.status()["models"]["medium"]["evictions"] == 1
        assert models.status()["used"] <= models.budget
        await models.stop()

    asyncio.run(run())


def test_neither_a_model_in_flight_nor_a_pinned_one_is_evicted(family: dict[str, Path], sizes: dict[str, int]) -> None:
    async def run() -> None:
        models = ModelSet(specs_of(family, pin=("large",)), budget=two_of_three(sizes))
        await models.start()  # large (pinned) is the least recently used from here on
        _held = await models.acquire("medium")
        models.release(await models.acquire("other"))  # no room: medium is in flight, large pinned
        raise AssertionError("other cannot have been loaded")

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(asyncio.wait_for(run(), 5))

    async def run_then_release() -> None:
        models = ModelSet(specs_of(family, pin=("large",)), budget=two_of_three(sizes))
        await models.start()
        held = await models.acquire("medium")
        waiting = asyncio.ensure_future(models.acquire("other"))
        await asyncio.sleep(0.5)
        assert not waiting.done() and states(models)["medium"] == "resident"
        models.release(held)  # now medium is idle: the load waiting for room takes its place
        models.release(await asyncio.wait_for(waiting, 30))
        assert states(models) == {"large": "resident", "medium": "unloaded", "other": "resident"}
        await models.stop()

    asyncio.run(run_then_release())


def test_unload_drops_an_idle_model_never_one_in_flight_nor_a_pinned_one(
    family: dict[str, Path], sizes: dict[str, int]
) -> None:
    async def run() -> None:
        models = ModelSet(specs_of(family, pin=("other",)), budget=1 << 40)
        for name in FAMILY:
            models.release(await models.acquire(name))
        held = await models.acquire("medium")
        assert not await models.unload("medium")  # in flight
        assert not await models.unload("other")  # pinned
        assert await models.unload("large")  # idle: gone, the parts it shares with medium stay for medium
        assert states(models) == {"large": "unloaded", "medium": "resident", "other": "resident"}
        assert models.status()["models"]["large"]["evictions"] == 1
        assert not await models.unload("large")  # not resident: nothing to do
        models.release(held)
        assert await models.unload("medium")
        again = await models.acquire("large")  # comes back on demand, as after any eviction
        assert states(models)["large"] == "resident" and models.status()["models"]["large"]["loads"] == 2
        models.release(again)
        await models.stop()

    asyncio.run(run())


def test_concurrent_requests_never_lose_their_model(family: dict[str, Path], sizes: dict[str, int]) -> None:
    """Tasks hold random models while others force loads; each checks, all through its hold, that its model stays
    resident and the very objects it holds are still the set's. Releases come from other threads."""

    async def request(models: ModelSet, name: str, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0, 0.5))
        held = await models.acquire(name, timeout=60)
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.005, 0.03))
            assert states(models)[name] == "resident", (name, states(models))
            assert models._models[name].loaded is held.loaded
        await asyncio.to_thread(models.release, held)

    async def run() -> None:
        models = ModelSet(specs_of(family), budget=max(sizes.values()) + 1000)  # one model at a time
        await models.start()
        rng = random.Random(5)
        names = [rng.choice(list(family)) for _ in range(24)]
        await asyncio.gather(*(request(models, n, rng) for n in names))
        status = models.status()["models"]
        assert sum(s["evictions"] for s in status.values()) >= 2, (
            status
        )  # the test did evict (three models, room for one)
        assert all(s["in_flight"] == 0 for s in status.values())
        await models.stop()

    asyncio.run(run())


def test_requests_for_a_model_being_loaded_wait_for_that_one_load(family: dict[str, Path]) -> None:
    proceed = threading.Event()

    def build(spec, loaded):  # noqa: ANN001, ANN202 - the served bundle: here, a gate held while loading
        assert proceed.wait(30)
        return {"model": spec.name}

    async def run() -> None:
        models = ModelSet(specs_of(family), budget=1 << 40, build=build)
        seen: list[tuple[str, str]] = []
        models.on_state(lambda name, state: seen.append((name, state)))
        first = asyncio.ensure_future(models.acquire("other"))
        while ("other", "loading") not in seen:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(models.acquire("other"))
        await asyncio.sleep(0.1)
        proceed.set()
        a, b = await asyncio.gather(first, second)
        assert a.loaded is b.loaded and a.served is b.served == {"model": "other"}
        assert models.status()["models"]["other"]["loads"] == 1
        assert seen == [("other", "loading"), ("other", "resident")]
        models.release(a)
        models.release(b)
        await models.stop()

    asyncio.run(run())


def test_a_model_too_large_is_refused(family: dict[str, Path], sizes: dict[str, int]) -> None:
    async def run() -> None:
        models = ModelSet(specs_of(family), budget=sizes["large"] // 2)
        with pytest.raises(ModelsRefused) as refused:
            await models.start()
        assert sorted(r.name for r in refused.value.refused) == ["large", "medium", "other"]
        with pytest.raises(ModelTooLarge, match="'other' needs about"):
            await models.acquire("other")
        assert states(models)["other"] == "unloaded" and len(models.cache) == 0

    asyncio.run(run())


def test_a_failed_load_says_why_and_holds_nothing(family: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(family["large"], broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")

    async def run() -> None:
        models = ModelSet(
            parse_model_options([f"broken={broken}"]), budget=1 << 40, estimate=lambda spec: [Part("all", None, 1)]
        )
        with pytest.raises(ModelLoadFailed, match="'broken' failed to load") as failed:
            await models.acquire("broken")
        assert "Hint:" in str(failed.value.error)
        assert states(models) == {"broken": "unloaded"} and len(models.cache) == 0
        assert models.status()["models"]["broken"]["in_flight"] == 0

    asyncio.run(run())


def test_choose_victims_counts_a_shared_component_once() -> None:
    shared, a, b, c = (Part("x", key, n) for key, n in (("s", 10), ("a", 1), ("b", 1), ("c", 1)))
    resident = {"A": [shared, a], "B": [shared, b]}
    assert device_bytes(resident) == 12
    # C shares s: evicting A frees only a; B stays.
    assert choose_victims(("C", [shared, c]), resident, ["A", "B"], 12) == ["A"]
    assert choose_victims(("C", [shared, c]), resident, ["A", "B"], 13) == []
    assert choose_victims(("C", [c]), resident, ["A"], 11) is None
