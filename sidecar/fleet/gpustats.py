"""A pod's GPUs as Nomad reports them: which allocation serves an endpoint (Nomad's service
registrations) and that allocation's NVIDIA device statistics as one `GpuUsage`.

Pure: decoded JSON in, plain values out; gpureader.py does the reads.

Shapes matched (field names as Nomad's Go structs serialise them, no JSON tags renamed):
- `GET /v1/service/:service_name` → [ServiceRegistration{ID, ServiceName, Namespace, NodeID,
  Datacenter, JobID, AllocID, Tags, Address, Port, CreateIndex, ModifyIndex}]
  (hashicorp/nomad api/service_registrations.go at commit 16cb776; native service
  discovery, Nomad 1.3 and later).
- `GET /v1/client/allocation/:alloc_id/stats` → AllocResourceUsage{ResourceUsage{MemoryStats,
  CpuStats, DeviceStats: [DeviceGroupStats{Vendor, Type, Name, InstanceStats: {device id:
  DeviceStats{Summary, Stats: StatObject{Nested, Attributes: {name: StatValue}},
  Timestamp}}}]}, Tasks: {task: TaskResourceUsage{ResourceUsage, Timestamp, Pids}},
  Timestamp} (api/nodes.go at c7c10e8, api/tasks.go at 880ba14; StatValue as
  plugins/shared/structs/stats.go defines it:
  FloatNumeratorVal, FloatDenominatorVal, IntNumeratorVal, IntDenominatorVal, StringVal,
  BoolVal, Unit, Desc, each omitted when empty). The client fills a task's DeviceStats with
  its allocated devices (client/allocrunner/taskrunner/task_runner.go LatestResourceUsage)
  and the allocation's ResourceUsage appends every task's.
- The NVIDIA device plugin (hashicorp/nomad-device-nvidia stats.go at commit 24e390a, after
  release 1.1.0; the same names as its earlier copies inside Nomad, devices/gpu/nvidia):
  Vendor "nvidia", Type "gpu"; attribute "GPU utilization" = IntNumeratorVal in percent
  (no denominator); "Memory state" = IntNumeratorVal used MiB / IntDenominatorVal total MiB
  (also the Summary). "Memory utilization" is memory *bandwidth* in percent, not how full
  the memory is, so it is not read. A value NVML could not read is StringVal "N/A".
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from sidecar.fleet.podload import GpuUsage

NVIDIA_VENDOR = "nvidia"
GPU_TYPE = "gpu"
UTILIZATION_ATTR = "GPU utilization"   # percent of time a kernel ran
MEMORY_ATTR = "Memory state"           # used MiB / total MiB


class NomadShapeError(ValueError):
    """A Nomad answer that is not the documented shape (another API version, or a proxy)."""


def endpoint_address(url: str) -> tuple[str, int] | None:
    """An endpoint's host and port as a service registration spells them."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return _host(parts.hostname), port


def _host(host: str) -> str:
    host = host.strip("[]").lower()
    try:
        return str(ipaddress.ip_address(host))  # one spelling per address (IPv6 above all)
    except ValueError:
        return host


def allocations_by_endpoint(registrations: Any, urls: Iterable[str]) -> dict[str, str]:
    """Endpoint URL → the AllocID registered at its host:port. Where two registrations claim
    one address (an allocation replaced in place), the newest (ModifyIndex) wins."""
    if registrations is None:
        return {}  # Go's nil slice: no registration
    if not isinstance(registrations, list):
        raise NomadShapeError("service registrations: expected a JSON list")
    newest: dict[tuple[str, int], tuple[int, str]] = {}
    for item in registrations:
        if not isinstance(item, dict):
            continue
        alloc, address, port = item.get("AllocID"), item.get("Address"), item.get("Port")
        if not isinstance(alloc, str) or not alloc or not isinstance(address, str) \
                or isinstance(port, bool) or not isinstance(port, int):
            continue
        index = item.get("ModifyIndex")
        index = index if isinstance(index, int) and not isinstance(index, bool) else 0
        key = (_host(address), port)
        if key not in newest or index > newest[key][0]:
            newest[key] = (index, alloc)
    found = {}
    for url in urls:
        address_of = endpoint_address(url)
        if address_of is not None and address_of in newest:
            found[url] = newest[address_of][1]
    return found


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _numerator(stat: Any) -> float | None:
    if not isinstance(stat, Mapping):
        return None
    for key in ("IntNumeratorVal", "FloatNumeratorVal"):
        if (value := _number(stat.get(key))) is not None:
            return value
    return None


def _denominator(stat: Any) -> float | None:
    if not isinstance(stat, Mapping):
        return None
    for key in ("IntDenominatorVal", "FloatDenominatorVal"):
        if (value := _number(stat.get(key))) is not None:
            return value
    return None


def device_reading(device: Any) -> tuple[float | None, float | None]:
    """One device's (utilization, memory), each 0..1, or None where it is missing, "N/A"
    or out of range."""
    stats = device.get("Stats") if isinstance(device, Mapping) else None
    attributes = stats.get("Attributes") if isinstance(stats, Mapping) else None
    if not isinstance(attributes, Mapping):
        return None, None
    utilization = _numerator(attributes.get(UTILIZATION_ATTR))
    if utilization is not None:
        utilization = utilization / 100 if 0 <= utilization <= 100 else None
    memory = None
    memory_stat = attributes.get(MEMORY_ATTR)
    used, total = _numerator(memory_stat), _denominator(memory_stat)
    if used is not None and total is not None and total > 0 and 0 <= used <= total:
        memory = used / total
    return utilization, memory


def _groups(stats: Mapping[str, Any]) -> list[Any]:
    """The allocation's device groups; per task where the allocation's sum is absent."""
    usage = stats.get("ResourceUsage")
    groups = usage.get("DeviceStats") if isinstance(usage, Mapping) else None
    if isinstance(groups, list) and groups:
        return groups
    found: list[Any] = []
    tasks = stats.get("Tasks")
    if isinstance(tasks, Mapping):
        for task in tasks.values():
            task_usage = task.get("ResourceUsage") if isinstance(task, Mapping) else None
            task_groups = task_usage.get("DeviceStats") \
                if isinstance(task_usage, Mapping) else None
            if isinstance(task_groups, list):
                found.extend(task_groups)
    return found


def gpu_usage(stats: Any, at: float) -> GpuUsage | None:
    """An allocation's NVIDIA GPUs from its AllocResourceUsage: the mean utilization and the
    mean memory fraction over its devices (each device counted once, however many groups
    list it). None when it holds no NVIDIA GPU or none reports both figures."""
    if not isinstance(stats, Mapping):
        raise NomadShapeError("allocation stats: expected a JSON object")
    readings: dict[str, tuple[float | None, float | None]] = {}
    for group in _groups(stats):
        if not isinstance(group, Mapping) or group.get("Vendor") != NVIDIA_VENDOR \
                or group.get("Type") != GPU_TYPE:
            continue  # other vendors name their statistics otherwise
        instances = group.get("InstanceStats")
        if not isinstance(instances, Mapping):
            continue
        for device_id, device in instances.items():
            readings[str(device_id)] = device_reading(device)
    utilizations = [u for u, _ in readings.values() if u is not None]
    memories = [m for _, m in readings.values() if m is not None]
    if not utilizations or not memories:
        return None
    return GpuUsage(sum(utilizations) / len(utilizations), sum(memories) / len(memories),
                    len(readings), at)
