"""Power and energy of one GPU through NVML (the `pynvml` module of the `nvidia-ml-py` package).

What is read (`NvmlDevice`): the enforced power limit (W), the board's total-energy counter (mJ
since the driver loaded), the SM clock and its maximum (MHz), the board power now (W) and the
current clock-event ("throttle") reasons, a bit mask of which "SW power cap" (0x4) is the one that
matters here: the board is at its power limit and the driver lowers the clocks to stay there.

`measure_energy(fn, device)`: runs `fn` (one call enqueues work on the current CUDA stream, e.g. a
CUDA-graph replay) back to back and keeps the GPU busy throughout: chunks of calls of about
CHUNK_MS each, at most DEPTH chunks queued, the host waiting on the oldest before it adds one. After
a warm-up (clocks and the power controller settle), the window opens at the first moment the
energy counter has moved since the previous read and closes at the first move after `window_s`:
both ends sit on counter updates, so the counter's update period (tens of ms on some boards) does
not quantise the energy; the resolution left is one chunk. Mean power = counter delta / host time
between the two reads; time per call = CUDA events at the ends of the chunks retired at those reads
/ the calls between them; energy per call = mean power x time per call. A thread samples the SM
clock, the reasons and the power every SAMPLE_S during the window.

In LOCKSTEP (`lockstep_chunks`, then `measure_energy(..., calls_per_chunk=c, num_chunks=n)`: callables
that hold collectives, one process per GPU of a tensor-parallel run): every process must issue the same
calls, so the chunk size and the number of chunks are fixed beforehand (agreed over the processes) and
all of them are issued whatever the counter does; the window is taken inside them by the same rule,
and a failed NVML read counts as "the counter has not moved" rather than stopping the loop.

`measure_static_power(device)`: what "static" means here. Idle (nothing queued) is not the floor a
running layer sits on: with nothing to do the GPU drops its clocks to idle and draws ~70 W on an
H100. A nearly empty kernel -- one thread spinning on the clock (`torch.cuda._sleep`) -- keeps the
GPU in its busy performance state at its boost clock while doing next to no work: that board power
(leakage and clock tree of every SM at that clock, HBM refresh, the board's own losses) is what
every kernel pays per unit of time whatever it computes, and it is what is taken as STATIC. An op's
DYNAMIC energy is its measured energy minus static power x its time. Under the power cap the driver
lowers clock and voltage and the true static draw falls with them, so this static figure (taken at
the boost clock) is on the high side, the headroom P_limit - P_static on the low side and a power
bound built on it on the slow side; `nfsearch calibrate`'s energy factor absorbs what is left. The
idle power is read too (nothing queued, same window rule), for reference only.

Without pynvml, without a driver, or on a GPU without an energy counter, `open_device` returns None
and a one-line note saying which; callers then measure no energy (a note, never a crash).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

from nfsearch.runreport import PowerReading, TimingPower

# clock-event reason bits (nvml.h nvmlClocksEventReason*)
SW_POWER_CAP = 0x4
REASON_NAMES = {0x1: "GPU idle", 0x2: "applications clocks", SW_POWER_CAP: "SW power cap", 0x8: "HW slowdown",
                0x10: "sync boost", 0x20: "SW thermal slowdown", 0x40: "HW thermal slowdown",
                0x80: "HW power brake", 0x100: "display clock"}

CHUNK_MS = 5.0              # GPU time per chunk of calls: the host checks the counter once per chunk
DEPTH = 3                   # chunks queued ahead (the GPU never waits on the host)
MAX_CALLS_PER_CHUNK = 4096
SAMPLE_S = 0.01             # clock / reasons / power sampling period during a window
WARMUP_S = 0.2              # back-to-back work before the window: clocks and the power controller settle
WINDOW_S = 0.3              # the energy window (at least; it ends on a counter update)
MIN_WINDOW_S = 0.05
MAX_WAIT_S = 3.0            # beyond warm-up + window: a counter that has not moved by then gives up
CAPPED_SHARE = 0.5          # a window is power-capped when the SW power cap is on in this share of samples
STATIC_SPIN_MS = 1.0        # one spin kernel of the static-power loop
LOCKSTEP_SLACK_S = 0.4      # lockstep: work beyond warm-up + window, for the counter's update period
MAX_LOCKSTEP_CHUNKS = 2000


class EnergyError(RuntimeError):
    """An energy measurement that could not be made (the counter did not move, the GPU idled)."""


@dataclass(frozen=True)
class NvmlSample:
    time_s: float               # host perf_counter
    sm_clock_mhz: float
    reasons: int
    power_w: float
    energy_mj: int | None = None   # the board's energy counter at time_s; None where it cannot be read


class NvmlDevice:
    """One GPU's NVML handle and the readings this project uses. Close it (or use `with`)."""

    def __init__(self, nvml, handle, how: str):
        self._nvml, self._handle, self.how = nvml, handle, how
        self._reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        self._is_open = True

    def power_limit_w(self) -> float:
        return self._nvml.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1e3

    def energy_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def sm_clock_mhz(self) -> float:
        return float(self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM))

    def max_sm_clock_mhz(self) -> float:
        return float(self._nvml.nvmlDeviceGetMaxClockInfo(self._handle, self._nvml.NVML_CLOCK_SM))

    def power_w(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3

    def reasons(self) -> int:
        """The current clock-event reasons (the older "throttle reasons" call on older drivers)."""
        if self._reasons_fn is not None:
            try:
                return int(self._reasons_fn(self._handle))
            except self._nvml.NVMLError:
                self._reasons_fn = None          # a driver without the newer call: the older one from now on
        return int(self._nvml.nvmlDeviceGetCurrentClocksThrottleReasons(self._handle))

    def name(self) -> str:
        name = self._nvml.nvmlDeviceGetName(self._handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def sample(self) -> NvmlSample:
        """The energy counter (read first, right after the host time stamp: runtime.bucket_energy
        aligns it with the iterations; None where the read fails), then SM clock, reasons and power."""
        now = time.perf_counter()
        energy = _energy_or_none(self)
        return NvmlSample(now, self.sm_clock_mhz(), self.reasons(), self.power_w(), energy)

    def close(self) -> None:
        if self._is_open:
            self._is_open = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting NVML down is best effort
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_device(cuda_index: int = 0) -> tuple[NvmlDevice | None, str]:
    """NVML's handle of CUDA device `cuda_index` (found by its PCI bus id, else its UUID, else its index
    where CUDA_VISIBLE_DEVICES renumbers nothing), and a note on how; (None, why) where NVML cannot
    give power and energy: no pynvml, no NVML library, no such device, no energy counter."""
    try:
        import pynvml
    except ImportError:
        return None, "no NVML: pynvml is not installed (pip install nvidia-ml-py, in the gpu extra); no energy measured"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, driver not loaded, ...
        return None, f"no NVML: nvmlInit failed ({_why(exc)}); no energy measured"
    try:
        handle, how = _handle(pynvml, cuda_index)
        device = NvmlDevice(pynvml, handle, how)
        device.energy_mj()
        device.power_limit_w()
        device.sm_clock_mhz()
    except Exception as exc:  # noqa: BLE001 - NotSupported (no energy counter before Volta), no device, ...
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
        return None, f"no NVML power readings for CUDA device {cuda_index} ({_why(exc)}); no energy measured"
    return device, f"NVML device {how}"


def _energy_or_none(device: NvmlDevice) -> int | None:
    """The energy counter, or None where the read fails (a lost read must not stop a loop whose
    calls other processes wait on; see lockstep in the module doc)."""
    try:
        return device.energy_mj()
    except Exception:  # noqa: BLE001 - NVMLError of one read
        return None


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _handle(pynvml, cuda_index: int):
    """The NVML handle of a CUDA device: by PCI bus id, else UUID, else index (NVML numbers every GPU
    of the host, CUDA only the visible ones, in its own order)."""
    import os

    import torch
    props = torch.cuda.get_device_properties(cuda_index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        bus_id = f"{int(getattr(props, 'pci_domain_id', 0) or 0):08X}:{int(bus):02X}:" \
                 f"{int(getattr(props, 'pci_device_id', 0) or 0):02X}.0"
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id), f"PCI {bus_id}"
        except pynvml.NVMLError:
            pass
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}"), f"UUID {text}"
        except pynvml.NVMLError:
            pass
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index), f"index {cuda_index}"
    raise RuntimeError(f"cannot map CUDA device {cuda_index} to NVML (CUDA_VISIBLE_DEVICES is set and the device "
                       "gave no PCI bus id or UUID)")


# ------------------------------------------------------------------------------------ sampling
class Sampler:
    """Samples NVML on a thread while the work runs (`with Sampler(device) as s:`); `s.samples` after.
    (The host waits on CUDA events with the GIL released, so the thread keeps its period.)"""

    def __init__(self, device: NvmlDevice, period_s: float = SAMPLE_S):
        self.device, self.period_s = device, period_s
        self.samples: list[NvmlSample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.device.sample())
            except Exception:  # noqa: BLE001 - a failed read loses one sample, not the measurement
                self.errors += 1
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list[NvmlSample]:
        return [s for s in self.samples if t0 <= s.time_s <= t1]


@dataclass(frozen=True)
class SampleSummary:
    """Clocks, reasons and power of a list of samples."""
    num_samples: int
    sm_clock_mhz: float | None          # median
    min_sm_clock_mhz: float | None
    capped_share: float                 # share of samples with the SW power cap reason on
    reasons: tuple[tuple[str, float], ...]   # (reason, share of samples), every reason seen
    sample_power_w: float | None        # median of NVML's power readings (its own averaging window)

    @property
    def is_power_capped(self) -> bool:
        return self.num_samples > 0 and self.capped_share >= CAPPED_SHARE


def summarize(samples: list[NvmlSample]) -> SampleSummary:
    n = len(samples)
    if not n:
        return SampleSummary(0, None, None, 0.0, (), None)
    clocks = [s.sm_clock_mhz for s in samples]
    seen = {}
    for bit, name in REASON_NAMES.items():
        count = sum(1 for s in samples if s.reasons & bit)
        if count:
            seen[name] = round(count / n, 3)
    return SampleSummary(n, statistics.median(clocks), min(clocks),
                         sum(1 for s in samples if s.reasons & SW_POWER_CAP) / n,
                         tuple(sorted(seen.items())), statistics.median(s.power_w for s in samples))


# ------------------------------------------------------------------------------------ energy
@dataclass(frozen=True)
class EnergyMeasurement:
    """One sustained back-to-back loop of a callable: per call, and what the GPU did meanwhile."""
    energy_j: float             # board energy per call (static included)
    time_ms: float              # GPU time per call (CUDA events)
    power_w: float              # mean board power over the window (energy counter / host time)
    window_s: float
    num_calls: int
    num_counter_updates: int    # energy counter moves inside the window
    gpu_busy_share: float       # GPU time over host time of the window (1: never idle)
    power_limit_w: float
    max_sm_clock_mhz: float
    samples: SampleSummary

    def __post_init__(self):
        for name in ("energy_j", "time_ms", "power_w", "window_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise EnergyError(f"energy measurement: {name} {value!r} is not positive")

    @property
    def is_power_capped(self) -> bool:
        return self.samples.is_power_capped

    def describe(self) -> str:
        s = self.samples
        clock = f"SM {s.sm_clock_mhz:.0f} MHz (max {self.max_sm_clock_mhz:.0f})" if s.sm_clock_mhz else "SM clock ?"
        cap = f"SW power cap in {s.capped_share:.0%} of {s.num_samples} samples"
        return (f"{self.energy_j * 1e3:.3f} mJ per call over {self.time_ms:.4f} ms; {self.power_w:.0f} W of "
                f"{self.power_limit_w:.0f} W; {clock}; {cap}")


def lockstep_chunks(per_fn_ms: float, window_s: float = WINDOW_S, warmup_s: float = WARMUP_S,
                    chunk_ms: float = CHUNK_MS, slack_s: float = LOCKSTEP_SLACK_S) -> tuple[int, int]:
    """(calls per chunk, number of chunks) of a lockstep measure_energy (module doc) of a callable that
    takes `per_fn_ms` (agreed over the processes: the slowest's): enough chunks to cover the warm-up,
    the window and `slack_s` for the counter's update period."""
    if not (math.isfinite(per_fn_ms) and per_fn_ms > 0):
        raise ValueError(f"lockstep_chunks: per_fn_ms must be positive, not {per_fn_ms!r}")
    per_chunk = max(1, min(MAX_CALLS_PER_CHUNK, math.ceil(chunk_ms / per_fn_ms)))
    total_ms = (warmup_s + window_s + slack_s) * 1e3
    return per_chunk, min(MAX_LOCKSTEP_CHUNKS, DEPTH + math.ceil(total_ms / (per_chunk * per_fn_ms)))


def measure_energy(fn, device: NvmlDevice, calls_per_fn: int = 1, window_s: float = WINDOW_S,
                   warmup_s: float = WARMUP_S, chunk_ms: float = CHUNK_MS, max_wait_s: float = MAX_WAIT_S,
                   calls_per_chunk: int | None = None, num_chunks: int | None = None) -> EnergyMeasurement:
    """Run `fn` back to back (see the module doc) and return the energy and time per call; `fn` does
    `calls_per_fn` calls (a CUDA graph of several launches of one op). Raises EnergyError when the
    energy counter does not move in time or the GPU was not kept busy.
    calls_per_chunk / num_chunks: lockstep (module doc; `lockstep_chunks` gives both): exactly
    3 + 1 + calls_per_chunk x num_chunks calls of `fn` are issued whatever happens, the error (if
    any) raised only after the last."""
    import torch

    is_lockstep = num_chunks is not None
    if not (window_s >= MIN_WINDOW_S and warmup_s >= 0 and chunk_ms > 0 and calls_per_fn >= 1):
        raise ValueError(f"measure_energy: window_s >= {MIN_WINDOW_S}, warmup_s >= 0, chunk_ms > 0 and "
                         f"calls_per_fn >= 1 needed, not {window_s}, {warmup_s}, {chunk_ms}, {calls_per_fn}")
    if is_lockstep != (calls_per_chunk is not None) or (is_lockstep and not (calls_per_chunk >= 1 and num_chunks >= 1)):
        raise ValueError(f"measure_energy: lockstep needs calls_per_chunk >= 1 and num_chunks >= 1 together, not "
                         f"{calls_per_chunk}, {num_chunks}")
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        fn()
    b.record()
    b.synchronize()
    per_fn_ms = max(a.elapsed_time(b) / 3, 1e-3)
    per_chunk = calls_per_chunk if is_lockstep else max(1, min(MAX_CALLS_PER_CHUNK, math.ceil(chunk_ms / per_fn_ms)))
    inflight: deque = deque()            # (end event, fn calls enqueued by then)
    queued = num_queued = 0

    def enqueue():
        nonlocal queued, num_queued
        for _ in range(per_chunk):
            fn()
        queued += per_chunk
        num_queued += 1
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        inflight.append((event, queued))

    def may_enqueue() -> bool:
        return not is_lockstep or num_queued < num_chunks

    for _ in range(DEPTH):
        if may_enqueue():
            enqueue()
    begin = time.perf_counter()
    start = end = None                   # (host time, counter mJ, chunk end event, calls done)
    last_mj, updates = _energy_or_none(device), 0
    with Sampler(device) as sampler:
        while inflight:
            if may_enqueue():
                enqueue()
            event, done = inflight.popleft()
            event.synchronize()
            if end is not None:
                continue                 # lockstep: the rest is issued and drained, not measured
            now, mj = time.perf_counter(), _energy_or_none(device)
            moved = mj is not None and last_mj is not None and mj != last_mj
            last_mj = mj if mj is not None else last_mj
            if start is None:
                if moved and now - begin >= warmup_s:
                    start = (now, mj, event, done)
            else:
                updates += moved
                if moved and now - start[0] >= window_s:
                    end = (now, mj, event, done)
                    if not is_lockstep:
                        break
            if not is_lockstep and now - begin > warmup_s + window_s + max_wait_s:
                break
    while inflight:
        inflight.popleft()[0].synchronize()
    if start is None or end is None:
        raise EnergyError(f"the energy counter did not move within {time.perf_counter() - begin:.1f} s "
                          f"of back-to-back work" + (f" ({num_queued} chunks of {per_chunk} calls, fixed)"
                                                     if is_lockstep else ""))
    try:                                 # read after the loop: a lockstep loop has issued every call by now
        limit_w, max_mhz = device.power_limit_w(), device.max_sm_clock_mhz()
    except Exception as exc:  # noqa: BLE001 - NVMLError
        raise EnergyError(f"NVML gave no power limit or clock after the loop ({_why(exc)})") from None
    host_s = end[0] - start[0]
    gpu_ms = start[2].elapsed_time(end[2])
    calls = (end[3] - start[3]) * calls_per_fn
    power_w = (end[1] - start[1]) / 1e3 / host_s
    time_ms = gpu_ms / calls
    busy = gpu_ms / 1e3 / host_s
    if busy < 0.8:
        raise EnergyError(f"the GPU was busy {busy:.0%} of the window (the host did not keep up with "
                          f"{per_fn_ms:.3f} ms calls); its power is not the callable's")
    return EnergyMeasurement(power_w * time_ms / 1e3, time_ms, power_w, host_s, calls, updates, busy, limit_w,
                             max_mhz, summarize(sampler.between(start[0], end[0])))


def reading_of(m: EnergyMeasurement, windows: EnergyWindows, num_layers: int):
    """The plan's runreport.PowerReading from its sustained loop `m` (one call = one replay of
    `num_layers` layers) and the NVML windows around its timing rounds."""
    rounds = summarize(windows.samples)
    s = m.samples
    return PowerReading(
        energy_per_layer_j=m.energy_j / num_layers, layer_ms=m.time_ms / num_layers, power_w=m.power_w,
        power_limit_w=m.power_limit_w, window_s=m.window_s, num_samples=s.num_samples,
        capped_share=round(s.capped_share, 4), sm_clock_mhz=s.sm_clock_mhz, min_sm_clock_mhz=s.min_sm_clock_mhz,
        max_sm_clock_mhz=m.max_sm_clock_mhz, reasons=s.reasons, timing_power_w=windows.power_w,
        timing_num_samples=rounds.num_samples, timing_capped_share=round(rounds.capped_share, 4),
        timing_sm_clock_mhz=rounds.sm_clock_mhz, timing_reasons=rounds.reasons)


def timing_power_of(windows: EnergyWindows):
    """runreport.TimingPower of the windows around one variant's timing rounds (no sustained loop)."""
    rounds = summarize(windows.samples)
    return TimingPower(windows.power_w, rounds.num_samples, round(rounds.capped_share, 4), rounds.sm_clock_mhz,
                       rounds.reasons)


@dataclass(frozen=True)
class StaticPower:
    """Board power with the SMs clocked but (nearly) idle, and with nothing queued (module doc)."""
    static_power_w: float
    sm_clock_mhz: float | None          # while the spin kernel ran
    idle_power_w: float | None          # nothing queued (clocks down): for reference
    method: str


def measure_static_power(device: NvmlDevice, window_s: float = WINDOW_S) -> StaticPower:
    """The static power: a one-thread spin kernel (torch.cuda._sleep) back to back (module doc)."""
    import torch

    cycles = max(1000, int(device.max_sm_clock_mhz() * 1e3 * STATIC_SPIN_MS))
    spin = measure_energy(lambda: torch.cuda._sleep(cycles), device, window_s=window_s)
    idle = measure_idle_power(device, window_s)
    method = (f"board power while one thread spins (torch.cuda._sleep, {STATIC_SPIN_MS:g} ms kernels back to "
              f"back): the GPU stays at its busy clock and does next to no work; NVML energy counter over "
              f"{spin.window_s:.2f} s")
    return StaticPower(spin.power_w, spin.samples.sm_clock_mhz, idle, method)


def measure_idle_power(device: NvmlDevice, window_s: float = WINDOW_S, poll_s: float = 0.005) -> float | None:
    """Board power with nothing queued, between two energy-counter updates at least `window_s` apart;
    None if the counter did not move."""
    import torch
    torch.cuda.synchronize()
    begin, last, start = time.perf_counter(), device.energy_mj(), None
    while time.perf_counter() - begin < window_s + MAX_WAIT_S:
        time.sleep(poll_s)
        now, mj = time.perf_counter(), device.energy_mj()
        if mj != last:
            if start is None:
                start = (now, mj)
            elif now - start[0] >= window_s:
                return (mj - start[1]) / 1e3 / (now - start[0])
        last = mj
    return None


# ------------------------------------------------------------------------------------ windows
class EnergyWindows:
    """Energy and samples over several windows of work (e.g. the timing rounds of one variant):
    `with w.window(): ...` reads the energy counter at both ends and samples in between. The
    counter's update period makes each window's energy coarse (a few % on 0.2 s windows), so the
    sum over the windows is a figure for cross-checking, not for fitting."""

    def __init__(self, device: NvmlDevice):
        self.device = device
        self.energy_mj = 0
        self.seconds = 0.0
        self.num_failed = 0             # windows whose energy could not be read
        self.samples: list[NvmlSample] = []

    def window(self):
        return _Window(self)

    @property
    def power_w(self) -> float | None:
        return self.energy_mj / 1e3 / self.seconds if self.seconds > 0 and self.energy_mj > 0 else None


class _Window:
    """One window of EnergyWindows. A failed NVML read loses the window's energy, never the work
    inside it (the timing it wraps goes on)."""

    def __init__(self, owner: EnergyWindows):
        self.owner = owner
        self.sampler = Sampler(owner.device)

    def __enter__(self):
        self.t0, self.e0 = time.perf_counter(), self._energy()
        self.sampler.__enter__()
        return self

    def __exit__(self, *exc):
        self.sampler.__exit__(*exc)
        t1, e1 = time.perf_counter(), self._energy()
        if self.e0 is not None and e1 is not None:
            self.owner.energy_mj += e1 - self.e0
            self.owner.seconds += t1 - self.t0
        else:
            self.owner.num_failed += 1
        self.owner.samples += self.sampler.samples
        return False

    def _energy(self) -> int | None:
        try:
            return self.owner.device.energy_mj()
        except Exception:  # noqa: BLE001 - see the class doc
            return None
