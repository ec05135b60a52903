"""This machine's GPUs as the loaded llama.cpp build sees them: CUDA, Metal, Vulkan, ROCm alike.

llama.cpp's own device list (`ggml_backend_dev_*`, read by `inventory.probe` in a child process) says
which GPUs this build can use, under which name (CUDA0, MTL0, Vulkan0, ROCm0 ...), of which kind, with
how much memory. Reading it costs a process start (about 0.6 s), so it is kept: the devices do not
change while the bridge runs, only their free memory. NVML refreshes an NVIDIA GPU's free memory on
every probe (bridge.hardware); a device NVML does not know is read again when its figures are older
than `REFRESH_S`.

Unified memory: an integrated GPU, and Apple silicon under Metal, take their memory from the RAM. Metal
reports `recommendedMaxWorkingSetSize` as the total and that minus what this process allocated as free
(ggml-metal-device.m, `ggml_metal_device_get_memory`), so the child's figure is the working-set limit
a new engine worker gets; the planner shares one pool between such a device and the host.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from .ggml import Device
from .inventory import Inventory
from .inventory import probe as read_inventory

REFRESH_S = 30.0  # how old the free memory of a device NVML does not know may be
RETRY_S = 60.0  # after a failed read (no llama_cpp, a crash), when to try again

# The registry name of Metal: "MTL" in this llama.cpp (ggml-metal.cpp, GGML_METAL_NAME), "Metal" in
# earlier ones (whose devices were named "Metal" too).
METAL_BACKENDS = frozenset({"MTL", "Metal"})
# GPUs a Mac drives through Metal that have memory of their own (Intel Macs with a Radeon).
DISCRETE_ON_METAL = ("AMD", "Radeon", "NVIDIA", "GeForce")

# Peak memory bandwidth of Apple silicon in GB/s, as Apple publishes it per chip (Apple newsroom and
# tech-spec pages; M1 to M4 as tabulated in ggml-org/llama.cpp discussion #4167, "Performance of
# llama.cpp on Apple Silicon M-series"; M5 from Apple's announcement of October 2025). Not measured here.
# Where one name covers two memory configurations, the lower one is kept and marked: M3 Max 300 or 400
# (14- or 16-core CPU), M4 Max 410 or 546 (14- or 16-core CPU). Chips missing here (M5 Pro/Max ...)
# get the lowest figure of their tier, as an estimate.
APPLE_BANDWIDTH_GBS: dict[str, tuple[float, bool]] = {  # chip -> (GB/s, lower of two configurations)
    "M1": (68.25, False), "M1 Pro": (200.0, False), "M1 Max": (400.0, False), "M1 Ultra": (800.0, False),
    "M2": (100.0, False), "M2 Pro": (200.0, False), "M2 Max": (400.0, False), "M2 Ultra": (800.0, False),
    "M3": (100.0, False), "M3 Pro": (150.0, False), "M3 Max": (300.0, True), "M3 Ultra": (819.0, False),
    "M4": (120.0, False), "M4 Pro": (273.0, False), "M4 Max": (410.0, True),
    "M5": (153.0, False),
}
APPLE_CHIP_RE = re.compile(r"\bApple (M\d+)(?: (Pro|Max|Ultra))?\b")
BUS_ID_RE = re.compile(r"^([0-9a-f]+):([0-9a-f]+):([0-9a-f]+)\.([0-9a-f]+)$", re.IGNORECASE)


def local_gpus(devices: list[Device]) -> list[Device]:
    """The GPUs of this machine llama.cpp would use, in its order (src/llama.cpp,
    `llama_prepare_model_devices`): one device per PCI bus id (a GPU that two backends list, CUDA and
    Vulkan, counts once, under the first), and integrated GPUs only when there is no discrete one."""
    seen: set[str] = set()
    found = []
    for d in devices:
        if not d.offloads or d.is_rpc:
            continue
        bus = normal_bus_id(d.device_id)
        if bus and bus in seen:
            continue
        if bus:
            seen.add(bus)
        found.append(d)
    discrete = [d for d in found if d.kind == "gpu"]
    return discrete or found


def is_unified(device: Device) -> bool:
    """Whether the device's memory is the machine's RAM: an integrated GPU, or a Mac's own GPU."""
    if device.kind == "igpu":
        return True
    return is_metal(device) and not any(word in device.description for word in DISCRETE_ON_METAL)


def is_metal(device: Device) -> bool:
    return device.backend in METAL_BACKENDS


def apple_bandwidth(description: str) -> tuple[float, str] | None:
    """(GB/s, where the figure comes from) for an Apple chip named in a Metal device's description
    ("Apple M2 Max"); None for other GPUs. A chip missing from the table gets the lowest figure Apple
    published for its tier, marked as an estimate."""
    match = APPLE_CHIP_RE.search(description)
    if not match:
        return None
    chip = " ".join(part for part in match.groups() if part)
    if chip in APPLE_BANDWIDTH_GBS:
        gbs, lower = APPLE_BANDWIDTH_GBS[chip]
        note = f"Apple's published figure for the {chip}"
        return gbs, note + (" (its smaller configuration)" if lower else "")
    tier = match.group(2) or ""
    same_tier = [gbs for name, (gbs, _) in APPLE_BANDWIDTH_GBS.items() if name.partition(" ")[2] == tier]
    return min(same_tier), f"an estimate: the lowest Apple published for an M-series {tier or 'base'} chip"


def normal_bus_id(bus_id: str | bytes | None) -> str | None:
    """A PCI bus id in llama.cpp's form, "0000:01:00.0": NVML writes "00000000:01:00.0" in capitals."""
    if not bus_id:
        return None
    text = bus_id.decode(errors="replace") if isinstance(bus_id, bytes) else bus_id
    match = BUS_ID_RE.match(text.strip())
    if not match:
        return text.strip().lower()
    domain, bus, device, function = (int(part, 16) for part in match.groups())
    return f"{domain:04x}:{bus:02x}:{device:02x}.{function:x}"


class LocalDevices:
    """llama.cpp's device list of this machine, read once and again only when asked for fresher figures.
    `read` is the boundary tests substitute: it answers what llama.cpp's device API says."""

    def __init__(self, read: Callable[[], Inventory] = read_inventory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read, self._clock = read, clock
        self._lock = threading.Lock()  # probes run in worker threads of the server
        self._found: Inventory | None = None
        self._at = 0.0
        self.reads = 0

    def get(self, max_age_s: float | None = None) -> Inventory:
        """The list; read (again) when there is none, when it is older than `max_age_s`, or when the last
        read failed more than RETRY_S ago."""
        with self._lock:
            if self._stale(max_age_s):
                self._found, self._at = self._read(), self._clock()
                self.reads += 1
            assert self._found is not None
            return self._found

    def forget(self) -> None:
        """Read again next time (a GPU driver was restarted, a test changed the machine)."""
        with self._lock:
            self._found = None

    def _stale(self, max_age_s: float | None) -> bool:
        if self._found is None:
            return True
        age = self._clock() - self._at
        if self._found.error:
            return age > RETRY_S
        return max_age_s is not None and age > max_age_s


local_devices = LocalDevices()
