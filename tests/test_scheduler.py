"""BaseAsyncScheduler and async_retrieve_timesteps."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

from utils import BaseAsyncScheduler, async_retrieve_timesteps


def test_proxy_reads_and_writes_reach_the_wrapped_scheduler() -> None:
    inner = FlowMatchEulerDiscreteScheduler(shift=3.0)
    proxy = BaseAsyncScheduler(inner)
    assert proxy.config.shift == 3.0
    assert proxy.timesteps is inner.timesteps
    proxy.custom_flag = 7
    assert inner.custom_flag == 7
    proxy.set_timesteps(5)
    assert len(inner.timesteps) == 5
    # Wrapping a wrapper does not nest.
    assert BaseAsyncScheduler(proxy).scheduler is inner


def test_repr_and_str_are_readable() -> None:
    proxy = BaseAsyncScheduler(FlowMatchEulerDiscreteScheduler())
    proxy.set_timesteps(4)
    assert repr(proxy) == "BaseAsyncScheduler(FlowMatchEulerDiscreteScheduler, timesteps=4)"
    assert "FlowMatchEulerDiscreteScheduler" in str(proxy)


def test_clone_for_request_is_independent() -> None:
    shared = BaseAsyncScheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    shared.set_timesteps(28)
    before = shared.timesteps.clone()

    a = shared.clone_for_request(4)
    b = shared.clone_for_request(9)
    assert isinstance(a, BaseAsyncScheduler)
    assert a.scheduler is not shared.scheduler and a.scheduler is not b.scheduler
    assert len(a.timesteps) == 4 and len(b.timesteps) == 9
    # Stepping a clone leaves the others alone.
    sample = torch.zeros(1, 4, 2, 2)
    a.step(torch.ones_like(sample), a.timesteps[0], sample)
    assert a.step_index == 1 and b.step_index is None and shared.step_index is None
    assert torch.equal(shared.timesteps, before)


def test_clone_with_dynamic_shifting_waits_for_mu() -> None:
    shared = BaseAsyncScheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    clone = shared.clone_for_request(10)  # no mu: left for the pipeline to set
    assert clone.scheduler is not shared.scheduler
    clone = shared.clone_for_request(10, mu=0.8)
    assert len(clone.timesteps) == 10


def test_async_retrieve_timesteps_default_matches_diffusers() -> None:
    ours, theirs = FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    t1, n1 = async_retrieve_timesteps(ours, 12, "cpu")
    t2, n2 = retrieve_timesteps(theirs, 12, "cpu")
    assert n1 == n2 == 12
    assert torch.equal(t1, t2)
    assert torch.equal(ours.timesteps, t1)  # the default mutates, exactly like diffusers


def test_async_retrieve_timesteps_return_scheduler_leaves_shared_untouched() -> None:
    shared = FlowMatchEulerDiscreteScheduler(shift=3.0)
    shared.set_timesteps(28)
    before = shared.timesteps.clone()
    timesteps, n, local = async_retrieve_timesteps(shared, 7, "cpu", return_scheduler=True)
    assert n == 7 and len(timesteps) == 7
    assert local is not shared and torch.equal(local.timesteps, timesteps)
    assert torch.equal(shared.timesteps, before)

    wrapped = BaseAsyncScheduler(shared)
    _, _, local = async_retrieve_timesteps(wrapped, 3, return_scheduler=True)
    assert isinstance(local, BaseAsyncScheduler) and local.scheduler is not shared


def test_custom_sigmas_and_timesteps() -> None:
    flow = FlowMatchEulerDiscreteScheduler()
    timesteps, n = async_retrieve_timesteps(flow, sigmas=[1.0, 0.75, 0.5, 0.25])
    assert n == 4 == len(timesteps)

    ddim = DDIMScheduler()
    with pytest.raises(ValueError, match="does not accept custom `sigmas`"):
        async_retrieve_timesteps(ddim, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="does not accept custom `timesteps`"):
        async_retrieve_timesteps(ddim, timesteps=[999, 500], return_scheduler=True)
    with pytest.raises(ValueError, match="not both"):
        async_retrieve_timesteps(flow, timesteps=[1, 2], sigmas=[1.0, 0.5])
