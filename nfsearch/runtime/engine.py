"""The serving engine: a whole model over a paged KV cache serving requests, with NanoFlow's batch
formation (serving.scheduler), one CUDA graph per bucket and asynchronous CPU scheduling.

Start-up, timed as load / compile / capture:
1. the config and the weights (random unless a HuggingFace folder is given);
2. the dense batch and decode slots (given, or from the trace's lengths and the memory an analytic plan
   leaves) and the buckets (serving's default_buckets, capped at the trace's longest request), all
   worked out torch-free by runtime.engine_memory.size_batch (the plan families use it too); a dense
   batch or memory setting that cannot fit is refused here, before the weights are loaded;
3. on the GPU, a dry run of every bucket on a model with a cache of one request (Triton compiles its
   kernels; the peak of each forward's temporaries is measured); the KV cache gets what the budget
   leaves (refused, with the numbers, when the longest request would not fit);
4. the model with its cache, and every bucket's CUDA graph.

The loop (run): launch iteration i, form i+1 on the CPU while the GPU runs i, launch it, and only
then read i's sampled ids (one event wait, runtime.engine_runner). The scheduler knows which tokens
are still on the device, so i+1's decode rows read them there; end of sequence is seen one
iteration late and the extra token is discarded. is_async False reads each iteration before
forming the next (the same tokens, the reference order).
"""

from __future__ import annotations

import gc
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nfsearch.errors import NfsearchError
from nfsearch.runtime import device as device_mod
from nfsearch.runtime import engine_memory as mem
from nfsearch.runtime import engine_plans, tpot_cap
from nfsearch.runtime.engine_memory import TraceShape  # the engine's argument type, long imported from here
from nfsearch.runtime.engine_runner import StepRunner, dry_forward
from nfsearch.runtime.fp8_checkpoint import checkpoint_format
from nfsearch.runtime.paged_model import PagedModel
from nfsearch.runtime.weights import load_weights
from nfsearch.serving.metrics import BatchStats
from nfsearch.serving.model_config import load_model_config
from nfsearch.serving.pages import PageManager
from nfsearch.serving.scheduler import Scheduler, SchedulerConfig, sequence_from_request
from nfsearch.serving.traces import Request, prompt_ids_for

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
QUANTIZATIONS = (None, "fp8")    # fp8: W8A8 e4m3 GEMMs (runtime.fp8, kernels.gemm_fp8); opt-in numerics
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}    # None: the model's dtype
# The plan's kernels per dense op at the full GPU (docs/kernels.md: cuBLAS GEMMs, the Triton
# norm and SiLU-and-mul); "baseline" runs torch for every dense op. Both use the paged attention.
PLAN_OPS = {"norm1": "triton", "norm2": "triton", "act": "triton"}
# "sequential": a plan family's kernels with each bucket's plan run op by op, no side streams
# (runtime.engine_plans gives its buckets their kernels; `bench --plans F --compare` alternates it with "plan")
VARIANT_OPS = {"plan": PLAN_OPS, "baseline": {}, "sequential": PLAN_OPS}
FP8_GEMM = "fp8-e4m3 w8a8 per-channel/per-token"


@dataclass
class IterationRecord:
    variant: str
    bucket: int                      # index into Engine.buckets
    num_tokens: int                  # real rows (no padding)
    num_decode: int
    num_segments: int
    launch_s: float                  # from the run's start
    used_pages: int
    gpu_ms: float = 0.0              # CUDA events around the replay, read one iteration late
    host_ms: float = 0.0             # the launch on the host (on the CPU: the whole forward)

    @property
    def time_ms(self) -> float:
        """The iteration's measured time: GPU time, else (CPU) the host's."""
        return self.gpu_ms or self.host_ms


@dataclass
class EngineRun:
    sequences: list                  # serving.batch.Sequence, every request (refused ones with .error)
    iterations: list[IterationRecord]
    wall_s: float
    num_preemptions: int
    num_discarded_tokens: int
    peak_used_pages: int
    num_host_waits: int
    num_eager_launches: int
    start_perf_s: float = 0.0        # host perf_counter at the run's start
    refused: list = field(default_factory=list)
    batch_stats: dict = field(default_factory=dict)   # variant -> serving.metrics.BatchStats


class Engine:
    def __init__(self, model: str | Path, *, device: str = "cuda", dtype: str = "bf16",
                 gpu_memory_utilization: float = 0.90, dense_batch: int | None = None,
                 max_decode: int | None = None, page_size: int = 16, attn_impl: str | None = None,
                 use_cuda_graphs: bool | None = None, is_async: bool = True, seed: int = 0,
                 trace_shape: TraceShape | None = None, num_pages: int | None = None,
                 memory_bytes: int | None = None, variants: tuple[str, ...] = ("plan",),
                 predicted_output_len: int | None = None, max_tpot_ms: float | None = None,
                 quantization: str | None = None, plans: str | None = None, log=None, kv_cache_dtype: str = "auto",
                 choose_gemms: bool = True):
        t_start = time.perf_counter()
        self.log = log or (lambda line: None)
        self.cfg = load_model_config(model)
        self.folder = Path(model) if Path(model).is_dir() else None
        self.device, self.is_async, self.seed, self.page_size = torch.device(device), is_async, seed, page_size
        self.predicted_output_len = predicted_output_len     # admission's output length (None: max_tokens)
        if self.device.type == "cuda":
            device_mod.require_cuda("the engine on device cuda", hint="--device cpu runs it with torch ops")
        if dtype not in DTYPES:
            raise NfsearchError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        self.dtype, self.dtype_name = DTYPES[dtype], dtype
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise NfsearchError(f"kv cache dtype {kv_cache_dtype!r}: use one of {', '.join(KV_CACHE_DTYPES)}")
        # "auto": the model's dtype; "fp8": e4m3 with a float32 scale per (token, kv head)
        self.kv_dtype = KV_CACHE_DTYPES[kv_cache_dtype] or self.dtype
        self.kv_dtype_name = dtype if kv_cache_dtype == "auto" else kv_cache_dtype
        self.is_cuda = self.device.type == "cuda"
        self.attn_impl = attn_impl or ("triton" if self.is_cuda else "torch")
        self.use_cuda_graphs = self.is_cuda and self.attn_impl != "torch" if use_cuda_graphs is None \
            else use_cuda_graphs and self.is_cuda
        if not 0.05 <= gpu_memory_utilization <= 1.0:
            raise NfsearchError(f"gpu memory utilization {gpu_memory_utilization}: expected 0.05..1.0")
        self.utilization = gpu_memory_utilization
        if quantization not in QUANTIZATIONS:
            raise NfsearchError(f"quantization {quantization!r}: use one of {', '.join(map(str, QUANTIZATIONS))}")
        self.quantization = quantization
        fp8_refusal = device_mod.fp8_support(self.device)
        if fp8_refusal and (quantization == "fp8" or kv_cache_dtype == "fp8"):
            asked = " and ".join(f for f, on in (("--quantization fp8", quantization == "fp8"),
                                                 ("--kv-cache-dtype fp8", kv_cache_dtype == "fp8")) if on)
            raise NfsearchError(f"{asked}: {fp8_refusal}")
        self.trace_shape = trace_shape or TraceShape(512, 512, self.cfg.max_model_len)
        self.family, self.bucket_kernels = None, []
        if plans is not None:        # a plan family (runtime.engine_plans): its dense batch and decode slots
            self.family, dense_batch, max_decode = engine_plans.read_family(plans, dense_batch, max_decode)
            if trace_shape is None:  # no trace (serving): the family's bucket contexts, its longest request
                self.trace_shape = TraceShape(512, 512, self.family.engine.max_context)
        # FP8 GEMM weights take ~0.57x the bf16 bytes: the batch is sized for the cache they leave
        is_fp8_gemms = not fp8_refusal and (quantization == "fp8" or (
            self.folder is not None and checkpoint_format(self.folder) is not None))
        self._choose_batch(dense_batch, max_decode, num_pages, memory_bytes, is_fp8_gemms)

        self.weights = self._load_weights(seed)
        if quantization == "fp8" and not self.weights.is_fp8:
            self.weights.quantize_()          # a subclass's loader (a TP rank's shard) left them bf16
        if self.weights.is_fp8 and fp8_refusal:   # an FP8 checkpoint on a GPU without FP8 tensor cores
            self.weights.dequantize_(self.dtype)
            self.log(f"the checkpoint's FP8 GEMM weights run in {dtype}: {fp8_refusal}")
        if self.weights.is_fp8:               # asked for, or an FP8 checkpoint
            self.quantization = "fp8"
        self._sync()
        self.load_s = time.perf_counter() - t_start
        self.compile_s = self._dry_run(num_pages) if self.is_cuda else 0.0
        self.model = self._new_model(self.num_pages)
        # --max-tpot: timed forwards of this model choose a smaller dense batch and its buckets
        self.tpot_cap = tpot_cap.cap_engine(self, max_tpot_ms) if max_tpot_ms is not None else None
        models = {name: self._variant(name) for name in variants}
        self.runner = StepRunner(models, self.buckets, page_size, self.device, self.use_cuda_graphs)
        if self.family is not None:  # each bucket's graph with its plan's kernels
            self.bucket_kernels = engine_plans.apply_family(self, self.family)
        self.gemm_choice = self._choose_gemms() if choose_gemms else None
        if self.use_cuda_graphs:
            self.runner.capture()
        self.capture_s = self.runner.capture_s
        self.variants = tuple(variants)
        self.log(self.describe())

    # ------------------------------------------------------------------------------ start-up
    def _choose_batch(self, dense_batch, max_decode, num_pages, memory_bytes, is_fp8_gemms=False) -> None:
        self.dtype_bytes = torch.tensor([], dtype=self.dtype).element_size()
        self.kv_token_bytes = mem.kv_token_bytes(self.cfg.spec, self.dtype_bytes,
                                                 "fp8" if self.kv_dtype == torch.float8_e4m3fn else "auto")
        self.total_bytes, self.other_bytes = memory_bytes, 0
        if self.is_cuda and memory_bytes is None:
            free, total = torch.cuda.mem_get_info(self.device)
            # memory torch has cached but holds no tensor in is ours to reuse, not another user's
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            self.total_bytes, self.other_bytes = total, total - free - cached
        sizing = mem.size_batch(self.cfg, self.trace_shape, self.total_bytes, dtype_bytes=self.dtype_bytes,
                                kv_token_bytes=self.kv_token_bytes, utilization=self.utilization,
                                other_bytes=self.other_bytes, page_size=self.page_size, dense_batch=dense_batch,
                                max_decode=max_decode, num_pages=num_pages, is_fp8_gemms=is_fp8_gemms)
        self.dense_batch, self.max_decode, self.buckets = sizing.dense_batch, sizing.max_decode, sizing.buckets
        self.max_context, self.min_pages = sizing.max_context, sizing.max_context // self.page_size
        self.max_logit_rows, self.num_pages, self.plan = sizing.max_logit_rows, sizing.num_pages, sizing.plan

    @property
    def _gemm_choice_s(self) -> float:
        return (self.gemm_choice or {}).get("seconds", 0.0)

    def _choose_gemms(self) -> dict | None:
        """Per bucket rows, cuBLAS or a faster GEMM kernel, timed before capture (runtime.gemm_choice);
        only the default engine: one GPU, bf16 GEMMs, CUDA graphs, no plan family."""
        if not self.use_cuda_graphs or self.family is not None or self.weights.is_fp8 or hasattr(self, "tp") \
                or self.dtype != torch.bfloat16:
            return None
        from nfsearch.runtime import gemm_choice
        t0 = time.perf_counter()
        rows = sorted({b.max_tokens for b in self.buckets})
        try:
            choices = gemm_choice.measure(torch, self.weights.layers, rows, self.model.num_sms, log=self.log)
            return gemm_choice.apply(self, choices) | {"seconds": time.perf_counter() - t0}
        except Exception as exc:  # noqa: BLE001 - cuBLAS everywhere, as without the choice; the run goes on
            self.runner.bucket_models = {k: v for k, v in self.runner.bucket_models.items() if k[0] != "plan"}
            self.log(f"gemm choice skipped: {type(exc).__name__}: {str(exc)[:160]}")
            return None

    def _load_weights(self, seed: int):
        """The model's weights on the device (runtime.engine_tp's ranks keep their shard)."""
        return load_weights(self.cfg, self.folder, self.device, self.dtype, seed, quantization=self.quantization)

    def _new_model(self, num_pages: int) -> PagedModel:
        return PagedModel(self.cfg, self.weights, num_pages, self.page_size, self.device, self.dtype,
                          self.attn_impl, max_tokens=max(b.max_tokens for b in self.buckets),
                          max_logit_rows=self.max_logit_rows, op_impls=VARIANT_OPS["plan"] if self.is_cuda else None,
                          kv_dtype=self.kv_dtype)

    def _variant(self, name: str) -> PagedModel:
        """A model sharing the engine model's weights, cache and buffers, with the variant's kernels."""
        if name not in VARIANT_OPS:
            raise NfsearchError(f"unknown variant {name!r} (known: {', '.join(VARIANT_OPS)})")
        if name == "plan":
            return self.model
        return self.model.with_ops(VARIANT_OPS[name] if self.is_cuda else None)   # the CPU runs torch ops

    def _dry_run(self, num_pages: int | None) -> float:
        """Every bucket once on a one-request cache: compiles the kernels and measures activation memory;
        then the KV plan from what is left. Returns the seconds it took."""
        t0 = time.perf_counter()
        base = torch.cuda.memory_allocated(self.device)
        dry = self._new_model(self.min_pages + 1)
        static = torch.cuda.memory_allocated(self.device) - base - dry.kv_num_bytes
        peak = 0
        for bucket in sorted(self.buckets, reverse=True):
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            dry_forward(dry, bucket, self.page_size, self.device)
            self._sync()
            peak = max(peak, torch.cuda.max_memory_allocated(self.device) - before)
        del dry
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        other = total - free - torch.cuda.memory_reserved(self.device)
        self.plan = mem.plan_pages(self.total_bytes if self.total_bytes else total, self.utilization, weights,
                                   static + peak, other, self.kv_token_bytes * self.page_size, self.page_size,
                                   self.min_pages, True,
                                   f"dense batch {self.dense_batch}")
        if num_pages is None:
            self.num_pages = self.plan.num_pages
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    @property
    def kv_tokens(self) -> int:
        return self.num_pages * self.page_size

    def max_concurrency(self) -> int:
        """Requests of the trace's mean length (prompt + output) the cache holds at once."""
        per_request = max(1.0, self.trace_shape.mean_prompt_len + self.trace_shape.mean_output_len)
        return int(self.kv_tokens / per_request)

    @property
    def gemm_numerics(self) -> str:
        """What the four GEMMs compute in, for every report: "fp8-e4m3 w8a8 per-channel/per-token" or
        the model's dtype ("bf16")."""
        return FP8_GEMM if self.quantization == "fp8" else self.dtype_name

    def describe(self) -> str:
        lines = [(f"model {self.cfg.spec.name} ({self.cfg.spec.num_layers} layers, {self.dtype_name}) on "
                 f"{self.device_name()}; attention {self.attn_impl}, CUDA graphs {'on' if self.use_cuda_graphs else 'off'}"),
                 (f"KV cache {self.kv_dtype_name} {self.kv_tokens:,} tokens ({self.num_pages:,} pages of "
                  f"{self.page_size}, {self.kv_token_bytes:,} bytes per token); max concurrency "
                 f"{self.max_concurrency():,} at the trace's mean prompt + output "
                 f"({self.trace_shape.mean_prompt_len:.0f} + {self.trace_shape.mean_output_len:.0f} tokens)"),
                 (f"dense batch {self.dense_batch} tokens, up to {self.max_decode} decode rows, "
                 f"{len(self.buckets)} buckets"),
                 (f"start-up {self.load_s + self.compile_s + self._gemm_choice_s + self.capture_s:.1f} s: load "
                  f"{self.load_s:.1f} s, compile (dry run) {self.compile_s:.1f} s"
                  + (f", GEMM choice {self._gemm_choice_s:.1f} s" if self.gemm_choice else "")
                  + f", capture {self.capture_s:.1f} s")]
        if self.plan is not None:
            lines.insert(2, self.plan.describe())
        if self.quantization or self.weights.fp8_source:
            lines.insert(1, f"GEMMs {self.gemm_numerics} ({self.weights.fp8_source})")
        if self.tpot_cap is not None:
            lines.insert(-1, self.tpot_cap.describe())
        return "\n".join(lines)

    # ------------------------------------------------------------------------------ the loop
    def new_scheduler(self) -> Scheduler:
        """A scheduler over an empty cache of this engine's pages, batch limits and buckets."""
        return Scheduler(SchedulerConfig(self.dense_batch, self.max_decode, self.buckets, self.page_size,
                                         self.cfg.max_model_len, self.cfg.eos_token_ids, self.predicted_output_len),
                         PageManager(self.num_pages, self.page_size))

    def run(self, requests: list[Request], *, sampling: dict | None = None, compare_every: int = 0,
            on_finish=None) -> EngineRun:
        """Serve `requests` (arrivals honoured) until every one has finished or been refused.
        compare_every > 0 alternates the engine's variants every that many iterations (same batches
        stream, one live cache). on_finish(seq) is called as each request ends."""
        sched = self.new_scheduler()
        vocab = self.cfg.spec.vocab_size
        # prompts drawn before the clock starts: the run times serving, not the trace's random ids
        arrivals = deque(sequence_from_request(r, prompt_ids_for(r, vocab, self.seed), **(sampling or {}))
                         for r in sorted(requests, key=lambda r: r.arrival_s))
        seqs, records = list(arrivals), []
        waits0, eager0 = self.runner.num_host_waits, self.runner.num_eager_launches
        stats = {v: BatchStats() for v in self.variants}
        in_flight, peak_pages, start = None, 0, time.perf_counter()
        for k in itertools.count():
            now = time.perf_counter() - start
            while arrivals and arrivals[0].arrival_s <= now:
                seq = arrivals.popleft()
                if not sched.add(seq) and on_finish:
                    on_finish(seq)
            variant = self.variants[(k // compare_every) % len(self.variants)] if compare_every else self.variants[0]
            in_flight, launched, read = self.step(sched, in_flight, start, variant)
            if on_finish:
                for _, done in read:
                    for seq in done:
                        on_finish(seq)
            if launched is not None:
                records.append(launched[1])
                stats[variant].add(launched[0].batch)
                peak_pages = max(peak_pages, launched[1].used_pages)
            if in_flight is None and launched is None and not sched.has_work():
                if not arrivals:
                    break
                time.sleep(max(0.0, arrivals[0].arrival_s - (time.perf_counter() - start)))
        wall_s = time.perf_counter() - start
        sched.pages.check_no_leaks()
        return EngineRun(seqs, records, wall_s, sched.num_preemptions, sched.num_discarded_tokens, peak_pages,
                         self.runner.num_host_waits - waits0, self.runner.num_eager_launches - eager0, start,
                         list(sched.refused), stats)

    def step(self, sched: Scheduler, in_flight, start: float, variant: str) -> tuple:
        """One iteration of the loop (Engine.run's and the online server's): form the next batch and launch
        it, and only then read the one in flight (is_async False: read this one at once). in_flight and
        what is launched: (runner launch, IterationRecord) or None. Returns (in flight now, launched now,
        [(batch read, the sequences it finished)])."""
        batch = sched.schedule(time.perf_counter() - start) if sched.has_work() else None
        launched = None
        if batch is not None:
            t_launch = time.perf_counter()
            launched = (self.runner.launch(batch, variant), IterationRecord(
                variant, self.buckets.index(batch.bucket), batch.num_tokens, batch.num_decode, batch.num_segments,
                time.perf_counter() - start, sched.pages.num_used_pages,
                host_ms=(time.perf_counter() - t_launch) * 1e3))
        to_read = [x for x in (in_flight, None if self.is_async else launched) if x is not None]
        read = [(x[0].batch, self.read(x, sched, start)) for x in to_read]
        return (launched if self.is_async else None), launched, read

    def read(self, in_flight, sched: Scheduler, start: float) -> list:
        """Wait for an iteration's sampled ids and postprocess them; the sequences it finished."""
        launched, record = in_flight
        ids, record.gpu_ms = self.runner.read(launched)
        if self.tpot_cap is not None:
            tpot_cap.observe_batch(self.tpot_cap, sched, launched.batch, record.time_ms)
        return sched.postprocess(launched.batch, ids, time.perf_counter() - start)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"
