"""Nomad's service registrations and allocation statistics, in the shapes Nomad and its NVIDIA
device plugin answer, read into endpoint → allocation and one GpuUsage per pod (pure)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sidecar.fleet.gpustats import (
    NomadShapeError,
    allocations_by_endpoint,
    endpoint_address,
    gpu_usage,
)
from sidecar.fleet.podload import GpuUsage
from tests.support.fake_nomad import FakeNomad, alloc_stats, nvidia_device


def test_one_h100_reads_as_its_utilization_and_memory_fraction() -> None:
    stats = alloc_stats({"GPU-8d1c": nvidia_device(87, 61_000, 81_559)})
    assert gpu_usage(stats, at=50.0) == GpuUsage(0.87, 61_000 / 81_559, 1, 50.0)


def test_several_devices_read_as_their_mean() -> None:
    stats = alloc_stats({"GPU-a": nvidia_device(90, 40_000, 80_000),
                         "GPU-b": nvidia_device(50, 20_000, 80_000)})
    usage = gpu_usage(stats, at=1.0)
    assert usage is not None
    assert usage.utilization == pytest.approx(0.70)
    assert usage.memory == pytest.approx(0.375)
    assert usage.devices == 2


def test_an_allocation_without_devices_has_no_reading() -> None:
    assert gpu_usage(alloc_stats({}), at=1.0) is None
    bare = alloc_stats({})
    bare["ResourceUsage"]["DeviceStats"] = None   # Go's nil slice
    bare["Tasks"]["server"]["ResourceUsage"]["DeviceStats"] = None
    assert gpu_usage(bare, at=1.0) is None
    assert gpu_usage({}, at=1.0) is None


def test_devices_of_other_vendors_are_not_read() -> None:
    stats = alloc_stats({"GPU-a": nvidia_device(90, 40_000, 80_000)})
    group = stats["ResourceUsage"]["DeviceStats"][0]
    group["Vendor"] = "amd"
    assert gpu_usage(stats, at=1.0) is None
    fpga = alloc_stats({"f0": nvidia_device(90, 40_000, 80_000)})
    fpga["ResourceUsage"]["DeviceStats"][0]["Type"] = "fpga"
    fpga["Tasks"]["server"]["ResourceUsage"]["DeviceStats"] = []
    assert gpu_usage(fpga, at=1.0) is None


def test_a_device_listed_by_the_allocation_and_its_task_counts_once() -> None:
    stats = alloc_stats({"GPU-a": nvidia_device(80, 10, 100)})
    stats["ResourceUsage"]["DeviceStats"] = stats["ResourceUsage"]["DeviceStats"] * 2
    usage = gpu_usage(stats, at=1.0)
    assert usage is not None and usage.devices == 1


def test_the_tasks_devices_are_read_when_the_allocation_sum_lacks_them() -> None:
    stats = alloc_stats({"GPU-a": nvidia_device(40, 20, 100)})
    stats["ResourceUsage"]["DeviceStats"] = []
    assert gpu_usage(stats, at=1.0) == GpuUsage(0.4, 0.2, 1, 1.0)


def test_not_available_and_bad_values_are_skipped_per_device() -> None:
    good = nvidia_device(60, 30, 100)
    no_util = nvidia_device(None, 50, 100)           # NVML could not read it: "N/A"
    no_memory = nvidia_device(20, None)
    usage = gpu_usage(alloc_stats({"a": good, "b": no_util, "c": no_memory}), at=1.0)
    assert usage is not None
    assert usage.utilization == pytest.approx(0.4)   # a and c
    assert usage.memory == pytest.approx(0.4)        # a and b
    assert usage.devices == 3

    bad: list[dict[str, Any]] = []
    for util, used, total in ((150, 10, 100), (-1, 10, 100), (50, 10, 0),
                              (50, 200, 100), (50, -5, 100)):
        bad.append(nvidia_device(util, used, total))
    weird = nvidia_device(50, 10, 100)
    weird["Stats"]["Attributes"]["GPU utilization"]["IntNumeratorVal"] = True
    weird["Stats"]["Attributes"]["Memory state"]["IntNumeratorVal"] = "10"
    bad.append(weird)
    nan = nvidia_device(50, 10, 100)
    nan["Stats"]["Attributes"]["GPU utilization"] = {"FloatNumeratorVal": float("nan")}
    nan["Stats"]["Attributes"]["Memory state"] = {"FloatNumeratorVal": float("inf"),
                                                   "FloatDenominatorVal": 1.0}
    bad.append(nan)
    for device in bad:
        # Each lacks a readable utilization or a readable memory figure: no reading.
        assert gpu_usage(alloc_stats({"x": device}), at=1.0) is None
        # Beside a good device, the bad one's figure is left out of the mean.
        usage = gpu_usage(alloc_stats({"x": device, "good": good}), at=1.0)
        assert usage is not None and usage.devices == 2
        assert usage.utilization in (pytest.approx(0.6), pytest.approx(0.55))
        assert usage.memory in (pytest.approx(0.3), pytest.approx(0.2))


def test_float_values_are_read_like_integers() -> None:
    device = nvidia_device(0, 0, 1)
    device["Stats"]["Attributes"]["GPU utilization"] = {"FloatNumeratorVal": 12.5}
    device["Stats"]["Attributes"]["Memory state"] = {"FloatNumeratorVal": 1.0,
                                                      "FloatDenominatorVal": 4.0}
    assert gpu_usage(alloc_stats({"a": device}), at=1.0) == GpuUsage(0.125, 0.25, 1, 1.0)


@pytest.mark.parametrize("body", [[], "stats", 3, None])
def test_an_answer_that_is_not_an_object_is_refused(body: Any) -> None:
    with pytest.raises(NomadShapeError):
        gpu_usage(body, at=1.0)


def test_the_garbage_inside_a_real_shape_reads_as_no_reading() -> None:
    stats = alloc_stats({"a": nvidia_device(50, 10, 100)})
    for mangle in (lambda s: s["ResourceUsage"].update(DeviceStats="x"),
                   lambda s: s["ResourceUsage"]["DeviceStats"][0].update(InstanceStats=[]),
                   lambda s: s["ResourceUsage"]["DeviceStats"][0]["InstanceStats"]["a"]
                   .update(Stats=None)):
        broken = copy.deepcopy(stats)
        mangle(broken)
        broken["Tasks"] = {}
        assert gpu_usage(broken, at=1.0) is None


def test_endpoints_match_registrations_by_address_and_port() -> None:
    nomad = FakeNomad()
    a = nomad.register("llm-small", "http://10.0.0.5:8000")
    b = nomad.register("llm-small", "http://10.0.0.6:8000")
    nomad.register("llm-small", "http://10.0.0.7:9000")        # no endpoint of ours
    registrations = nomad.services["llm-small"]
    found = allocations_by_endpoint(registrations, ["http://10.0.0.5:8000",
                                                   "http://10.0.0.6:8000/",
                                                   "http://10.0.0.6:8001",
                                                   "http://10.0.0.8:8000"])
    assert found == {"http://10.0.0.5:8000": a, "http://10.0.0.6:8000/": b}


def test_the_newest_registration_of_an_address_wins() -> None:
    nomad = FakeNomad()
    old = nomad.register("s", "http://10.0.0.5:8000")
    new = nomad.register("s", "http://10.0.0.5:8000")
    registrations = nomad.services["s"]
    assert allocations_by_endpoint(registrations, ["http://10.0.0.5:8000"]) == \
        {"http://10.0.0.5:8000": new}
    assert allocations_by_endpoint(list(reversed(registrations)),
                                   ["http://10.0.0.5:8000"]) == {"http://10.0.0.5:8000": new}
    assert old != new


def test_addresses_are_compared_in_one_spelling() -> None:
    assert endpoint_address("http://[::1]:8000") == ("::1", 8000)
    assert endpoint_address("https://Pod-1.example:443") == ("pod-1.example", 443)
    assert endpoint_address("https://pod-1.example") == ("pod-1.example", 443)
    assert endpoint_address("http://pod-1.example") == ("pod-1.example", 80)
    registrations = [{"AllocID": "x", "Address": "0:0:0:0:0:0:0:1", "Port": 8000}]
    assert allocations_by_endpoint(registrations, ["http://[::1]:8000"]) == \
        {"http://[::1]:8000": "x"}


def test_registrations_without_the_needed_fields_are_skipped() -> None:
    registrations: Any = [None, {"AllocID": "", "Address": "10.0.0.5", "Port": 8000},
                          {"AllocID": "a", "Address": 5, "Port": 8000},
                          {"AllocID": "b", "Address": "10.0.0.5", "Port": "8000"},
                          {"AllocID": "c", "Address": "10.0.0.5", "Port": True}]
    assert allocations_by_endpoint(registrations, ["http://10.0.0.5:8000"]) == {}
    assert allocations_by_endpoint(None, ["http://10.0.0.5:8000"]) == {}
    with pytest.raises(NomadShapeError):
        allocations_by_endpoint({"Services": []}, ["http://10.0.0.5:8000"])
