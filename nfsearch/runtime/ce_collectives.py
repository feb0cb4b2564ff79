"""An all-reduce whose data moves on the copy engines, its sum fused into the next RMSNorm.

NCCL's all-reduce runs as kernels: it takes SMs (16-24 to keep its speed on an H100, docs/gpu_facts.md)
from the GEMMs it should hide under. Here the bytes move with cudaMemcpyAsync between GPUs of one host
(NVLink, copy engines, no SM), and the sum is done by the RMSNorm that follows the all-reduce in the
layer anyway (kernels/sum_norm.py): one pass reads the N partials and writes the sum and the normed
rows. The network then costs the GEMMs no SMs; the only SM work is that norm pass, N reads instead
of one.

Data movement: one shot, push. Each rank copies its partial rows [a, b) into slot `rank` of every
peer's receive buffer (peer-mapped symmetric memory), then every rank sums the N slots locally in rank
order (the same bits on every rank). Bytes sent per rank for a message of S bytes:

    one shot (this)                          (N - 1) S        N=2: 1.0 S   N=4: 3.0 S
    reduce-scatter + all-gather of sum+norm  3 (N - 1) / N S  N=2: 1.5 S   N=4: 2.25 S
    reduce-scatter + all-gather of the sum   2 (N - 1) / N S  N=2: 1.0 S   N=4: 1.5 S (the norm then
                                                              needs its own pass after the gather)

One shot moves the fewest bytes at N=2 and is the only one whose norm fuses with the sum and needs no
second exchange; at N=4 the two-shot forms move fewer bytes but put a reduce kernel and a second
synchronised exchange on the critical path (left for after the N=2/N=4 measurements: with copies
that hide under a GEMM, the bytes matter less than the SMs and the steps).

Why torch's copy_ is a copy-engine memcpy here: symmetric memory's `get_buffer(peer, ...)` returns a
tensor whose device is THIS GPU and whose address is the peer's memory mapped into this process. A
copy_ between two tensors of one device with the same dtype and contiguous layout is "memcpy
eligible" in ATen's CUDA copy (aten/src/ATen/native/cuda/Copy.cu) and becomes one
cudaMemcpyAsync(DeviceToDevice) on the current stream; with a peer address the driver runs it on a
copy engine over NVLink. Rows [a, b) of a row-major [T, H] buffer are contiguous, so a slice of a
nano-op is one memcpy (no temporaries, no kernel).

Peer buffers: torch.distributed._symmetric_memory (the "CUDA" backend, no NVSHMEM) with
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NCCL_NVLS_ENABLE=0 (collectives.set_safe_env): plain
cuMemMap'ed memory exchanged by handle, no multicast object. The same calls (empty, rendezvous,
get_buffer, barrier) exist in torch 2.5 through 2.13.

Completion across GPUs, per slot (one slot per concurrently issued nano-op; flags in symmetric memory,
int32 [slots, 2, N]: DATA[j] = "rank j's rows for me have landed", ACK[j] = "rank j has consumed what I
sent it, I may overwrite"), all on the caller's stream S plus one side stream per peer for the copies:

    S:       wait ACK[j] == 1, set ACK[j] = 0                (for each peer j)
    C_j:     copy my rows -> peer j's slot `rank`; set peer j's DATA[rank] = 1
    S:       join the C_j; wait DATA[j] == 1, set DATA[j] = 0
    S:       sum_rmsnorm (the only SM work)
    S:       set peer j's ACK[rank] = 1

sync="memop" issues the waits and sets as CUDA stream memory operations (cuStreamWaitValue32 /
cuStreamWriteValue32 through cuda.bindings): executed by the GPU's front end, no SM, so a GEMM that
fills every SM cannot hold them up; a write-value fences the stream's earlier writes (our copies)
before the flag, so a peer that sees DATA sees the rows. The flags return to their initial state
(ACK 1, DATA 0) after every call, so a CUDA graph replays the same values. sync="barrier" uses
symmetric memory's barrier kernel instead (torch's async-TP pattern: barrier, copies, barrier): one
small block, but a block that waits for a free SM beside a full-grid GEMM. `CeAllReduce` checks at
set-up that memops work on every rank and falls back to "barrier" otherwise (`notes` says so).

CUDA graphs: copies, events and kernels are capturable; stream memory operations are captured as
batch-mem-op nodes by CUDA >= 12 drivers; symmetric memory's barrier is a kernel. Allocation and
rendezvous happen in __init__, before any capture (they block the host). Whether capture works on a
given GPU and driver, benchmarks/ce_allreduce.py finds out (it falls back to eager timing and says so).

On the CPU (gloo) there is no peer memory: `CeAllReduce` gathers the partial rows with
dist.all_gather into the same receive layout and runs the same sum/norm math (sum_rmsnorm_torch), so
the row bookkeeping, rank order and fused math are tested across processes.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from nfsearch.runtime.kernels.sum_norm import sum_rmsnorm, sum_rmsnorm_torch

SYNC_METHODS = ("memop", "barrier")
DATA, ACK = 0, 1


class CeError(RuntimeError):
    """The copy-engine all-reduce cannot be set up on this machine (no peer memory, no memops...)."""


def _check_driver(result):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise CeError(f"CUDA driver call failed: {err}")


class CeAllReduce:
    """Copy-engine all-reduce of row slices of a [max_rows, hidden] activation, fused with RMSNorm.

    One object per activation buffer (e.g. one for "mid", one for "out"), made on every rank of the
    group in the same order before any capture (it allocates symmetric memory: collective). `num_slots`:
    how many of its calls may be in flight at once (nano-ops of different row ranges issued on
    different streams); each call names its slot."""

    def __init__(self, group, max_rows: int, hidden_size: int, dtype=torch.bfloat16, device=None,
                 num_slots: int = 1, sync: str = "memop", num_sms: int | None = None):
        if max_rows < 1 or hidden_size < 1 or num_slots < 1:
            raise ValueError(f"max_rows, hidden_size and num_slots must be >= 1, not {max_rows}, "
                             f"{hidden_size}, {num_slots}")
        if sync not in SYNC_METHODS:
            raise ValueError(f"sync must be one of {', '.join(SYNC_METHODS)}, not {sync!r}")
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.max_rows, self.hidden_size, self.dtype = int(max_rows), int(hidden_size), dtype
        self.num_slots = int(num_slots)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl"
            else torch.device("cpu"))
        self.is_cuda = self.device.type == "cuda"
        self.sync = sync if self.is_cuda else "gloo"
        self.notes: list[str] = []
        self.peers = [j for j in range(self.world_size) if j != self.rank]
        self.num_sms = int(num_sms) if num_sms else (
            torch.cuda.get_device_properties(self.device).multi_processor_count if self.is_cuda else 1)
        if self.is_cuda:
            self._init_cuda()
        else:
            self.recv = torch.empty((self.world_size, self.max_rows, self.hidden_size), dtype=dtype,
                                    device=self.device)

    # ------------------------------------------------------------------ set-up (collective, eager)
    def _init_cuda(self) -> None:
        import torch.distributed._symmetric_memory as symm
        name = self.group.group_name
        try:
            if hasattr(symm, "set_backend") and symm.get_backend(self.device) is None:
                symm.set_backend("CUDA")        # plain peer memory; NVSHMEM is not needed for copies
        except (RuntimeError, AttributeError):   # already chosen by an earlier allocation: keep it
            pass
        if hasattr(symm, "enable_symm_mem_for_group"):
            # needed by older torch; newer torch (2.11 included) warns it is no longer needed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm.enable_symm_mem_for_group(name)
        N, R, H = self.world_size, self.max_rows, self.hidden_size
        self.recv = symm.empty((N, R, H), dtype=self.dtype, device=self.device)
        self.recv.zero_()
        self.recv_handle = symm.rendezvous(self.recv, name)
        self.flags = symm.empty((self.num_slots, 2, N), dtype=torch.int32, device=self.device)
        self.flags.zero_()
        self.flags[:, ACK, :] = 1           # "the peer has consumed": the first call may send
        self.flag_handle = symm.rendezvous(self.flags, name)
        torch.cuda.synchronize(self.device)
        self.peer_recv = {j: self.recv_handle.get_buffer(j, (N, R, H), self.dtype) for j in self.peers}
        self.peer_flags = {j: self.flag_handle.get_buffer(j, (self.num_slots, 2, N), torch.int32)
                           for j in self.peers}
        # one copy stream per peer: copies to different peers run on different copy engines at once
        self.copy_streams = {j: torch.cuda.Stream(self.device, priority=-1) for j in self.peers}
        if self.sync == "memop":
            ok, why = self._check_memops()
            if not _all_ranks_agree(self.group, ok, self.device):
                self.notes.append("stream memory operations do not work on every rank "
                                  f"({why or 'another rank failed'}); symmetric-memory barriers sync instead")
                self.sync = "barrier"
        dist.barrier(self.group)
        torch.cuda.synchronize(self.device)

    def _check_memops(self) -> tuple[bool, str | None]:
        """Write and wait on a scratch word of this GPU (nothing a peer reads): memops usable here?"""
        try:
            from cuda.bindings import driver as cu
        except ImportError:
            try:
                from cuda import cuda as cu  # cuda-python < 12.6 names the module so
            except ImportError:
                return False, "no cuda.bindings"
        self._cu = cu
        scratch = torch.zeros(1, dtype=torch.int32, device=self.device)
        try:
            stream = torch.cuda.current_stream(self.device)
            self._write_value(scratch.data_ptr(), 7, stream)
            self._wait_value(scratch.data_ptr(), 7, stream)
            torch.cuda.synchronize(self.device)
            if int(scratch.item()) != 7:
                return False, "a written value did not land"
        except (CeError, RuntimeError, TypeError, AttributeError) as exc:
            return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return True, None

    def _write_value(self, addr: int, value: int, stream) -> None:
        cu = self._cu
        _check_driver(cu.cuStreamWriteValue32(cu.CUstream(stream.cuda_stream), cu.CUdeviceptr(addr),
                                              cu.cuuint32_t(value),
                                              int(cu.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)))

    def _wait_value(self, addr: int, value: int, stream) -> None:
        cu = self._cu
        _check_driver(cu.cuStreamWaitValue32(cu.CUstream(stream.cuda_stream), cu.CUdeviceptr(addr),
                                             cu.cuuint32_t(value),
                                             int(cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ)))

    def _flag_addr(self, flags: torch.Tensor, slot: int, kind: int, rank: int) -> int:
        return flags.data_ptr() + ((slot * 2 + kind) * self.world_size + rank) * flags.element_size()

    # ------------------------------------------------------------------ the all-reduce
    def bytes_sent_per_rank(self, num_rows: int) -> int:
        """Bytes this rank pushes for rows [a, a + num_rows): its rows to each of the N - 1 peers."""
        return (self.world_size - 1) * num_rows * self.hidden_size * torch.empty((), dtype=self.dtype).element_size()

    def all_reduce_norm(self, partial: torch.Tensor, a: int, b: int, sum_out: torch.Tensor | None = None,
                        norm_out: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                        eps: float = 1e-5, residual: torch.Tensor | None = None, slot: int = 0,
                        num_sms: int | None = None) -> torch.Tensor:
        """Rows [a, b) of the activation: sum_out = the group's sum of `partial` (+ residual), and, with
        norm_out, norm_out = rmsnorm(sum_out) * weight. All [b - a, H]; sum_out defaults to `partial`
        itself (in place). Issued on the current stream (copies on side streams joined back to it).
        Every rank must make the same calls in the same order. Returns sum_out."""
        rows = b - a
        if not 0 <= a <= b <= self.max_rows:
            raise ValueError(f"rows [{a}, {b}) outside the {self.max_rows} rows this all-reduce was made for")
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside 0..{self.num_slots - 1}")
        if tuple(partial.shape) != (rows, self.hidden_size) or not partial.is_contiguous():
            raise ValueError(f"partial must be a contiguous [{rows}, {self.hidden_size}] slice, "
                             f"not {tuple(partial.shape)}")
        sum_out = partial if sum_out is None else sum_out
        recv = self.recv[:, a:b]
        if not self.is_cuda:
            gathered = [torch.empty_like(partial) for _ in range(self.world_size)]
            dist.all_gather(gathered, partial.contiguous(), group=self.group)
            for j in self.peers:
                recv[j].copy_(gathered[j])
            return sum_rmsnorm_torch(partial, recv, self.rank, sum_out, norm_out, weight, eps=eps, residual=residual)
        if rows == 0:
            return sum_out
        self._exchange(partial, a, b, slot)
        sum_rmsnorm(partial, recv, self.rank, sum_out, norm_out, weight, num_sms or self.num_sms, eps=eps,
                    residual=residual)
        self._release(slot)
        return sum_out

    def _exchange(self, partial, a: int, b: int, slot: int) -> None:
        """Copies to the peers and the waits until theirs have landed here (see the module docstring)."""
        stream = torch.cuda.current_stream(self.device)
        mine = self.flags
        if self.sync == "memop":
            for j in self.peers:
                self._wait_value(self._flag_addr(mine, slot, ACK, j), 1, stream)
                self._write_value(self._flag_addr(mine, slot, ACK, j), 0, stream)
        else:
            self.recv_handle.barrier(channel=2 * slot)         # every peer has consumed the last call
        fork = torch.cuda.Event()
        fork.record(stream)
        joins = []
        for j in self.peers:
            cs = self.copy_streams[j]
            cs.wait_event(fork)
            with torch.cuda.stream(cs):
                self.peer_recv[j][self.rank, a:b].copy_(partial, non_blocking=True)
                if self.sync == "memop":
                    # the write fences the copy before the flag: a peer seeing DATA sees the rows
                    self._write_value(self._flag_addr(self.peer_flags[j], slot, DATA, self.rank), 1, cs)
            done = torch.cuda.Event()
            done.record(cs)
            joins.append(done)
        for done in joins:
            stream.wait_event(done)
        if self.sync == "memop":
            for j in self.peers:
                self._wait_value(self._flag_addr(mine, slot, DATA, j), 1, stream)
                self._write_value(self._flag_addr(mine, slot, DATA, j), 0, stream)
        else:
            self.recv_handle.barrier(channel=2 * slot + 1)     # every peer's copies to me are done

    def _release(self, slot: int) -> None:
        """Tell each peer that its rows here are consumed (after the sum kernel, in stream order)."""
        if self.sync != "memop":
            return                                             # the next call's first barrier says it
        stream = torch.cuda.current_stream(self.device)
        for j in self.peers:
            self._write_value(self._flag_addr(self.peer_flags[j], slot, ACK, self.rank), 1, stream)

    def describe(self) -> dict:
        return {"impl": "ce", "algo": "one-shot push", "sync": self.sync, "world_size": self.world_size,
                "max_rows": self.max_rows, "hidden_size": self.hidden_size, "num_slots": self.num_slots,
                "notes": list(self.notes)}


def _all_ranks_agree(group, ok: bool, device) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, group=group)
    return float(flag.item()) == 0.0


def check_against_all_reduce(ce: CeAllReduce, ranges, seed: int = 0, eps: float = 1e-5) -> dict:
    """Run `ce` (norm fused) over row `ranges` (one slot each, issued back to back) on random partials
    and compare with dist.all_reduce (fp32) + torch's RMSNorm on the same partials. Every rank of the
    group calls it; returns this rank's worst relative errors and whether every rank got the same bits.
    Used by tests/test_ce_collectives.py (gloo) and benchmarks/ce_allreduce.py (NCCL, GPUs)."""
    import torch.nn.functional as F
    ranges = [(int(a), int(b)) for a, b in ranges]
    if len(ranges) > ce.num_slots:
        raise ValueError(f"{len(ranges)} row ranges need {len(ranges)} slots; the all-reduce has {ce.num_slots}")
    R, H, dt, dev = ce.max_rows, ce.hidden_size, ce.dtype, ce.device
    gen = torch.Generator().manual_seed(seed * 1000 + ce.rank)          # partials differ by rank
    partial = torch.randn((R, H), generator=gen).to(dt).to(dev)
    weight = (1.0 + 0.1 * torch.randn((H,), generator=torch.Generator().manual_seed(seed))).to(dt).to(dev)
    want = partial.float()
    dist.all_reduce(want, group=ce.group)
    want_sum = want.to(dt)
    want_norm = F.rms_norm(want_sum.float(), (H,), weight.float(), eps).to(dt)
    got_sum, got_norm = partial.clone(), torch.full_like(partial, float("nan"))
    for slot, (a, b) in enumerate(ranges):
        ce.all_reduce_norm(got_sum[a:b], a, b, norm_out=got_norm[a:b], weight=weight, eps=eps, slot=slot)
    if ce.is_cuda:
        torch.cuda.synchronize(dev)
    rows = torch.zeros(R, dtype=torch.bool)
    for a, b in ranges:
        rows[a:b] = True
    rows = rows.to(dev)

    def rel(x, y):
        x, y = x[rows].double(), y[rows].double()
        return float("inf") if not torch.isfinite(x).all() else float((x - y).norm() / y.norm().clamp_min(1e-30))

    first = got_sum.float()[rows].clone()           # rows outside the ranges keep each rank's partial
    dist.broadcast(first, src=dist.get_global_rank(ce.group, 0), group=ce.group)
    same = bool(torch.equal(first, got_sum.float()[rows]))
    same = _all_ranks_agree(ce.group, same, dev)
    return {"rank": ce.rank, "world_size": ce.world_size, "ranges": ranges, "sync": ce.sync,
            "rel_error_sum": rel(got_sum, want_sum), "rel_error_norm": rel(got_norm, want_norm),
            "is_same_on_all_ranks": same,
            "untouched_rows_kept": bool(torch.equal(got_sum[~rows], partial[~rows]))}
