"""The engine's whole-model forward over a paged KV cache against HuggingFace transformers (CPU, fp32),
the sampler, and model config / checkpoint loading.

A small local driver (not the engine's scheduler) forms the batches: prompts prefilled in chunks
over their cached prefix, then one decode token per request per step, several requests of
different lengths in one batch, page size 4 with pages handed out in shuffled order and reused.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field

import pytest
import torch

from nfsearch.errors import NfsearchError
from nfsearch.runtime.paged_model import PagedModel, StepBuffers, make_step_inputs
from nfsearch.runtime.sampling import SamplingTensors, sample
from nfsearch.runtime.weights import load_weights
from nfsearch.serving.model_config import load_model_config

transformers = pytest.importorskip("transformers")

PAGE_SIZE = 4
VOCAB = 128


@dataclass(frozen=True)
class Bucket:
    max_tokens: int
    max_decode: int
    max_segments: int
    max_context: int


BUCKET = Bucket(max_tokens=20, max_decode=5, max_segments=3, max_context=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize(model, seed: int) -> None:
    """O(1) activations and logits (HF's 0.02 init makes logits tiny, so any bug would pass a tolerance);
    norm weights away from 1 so that swapping them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:                       # q/k/v biases
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def _save(tmp_path_factory, name, model_cls, config) -> tuple:
    torch.manual_seed(0)
    model = model_cls(config).eval()
    _randomize(model, 1)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    cfg = transformers.LlamaConfig(**COMMON, rope_theta=10000.0, rms_norm_eps=1e-6, attn_implementation="eager")
    return _save(tmp_path_factory, "tiny-llama", transformers.LlamaForCausalLM, cfg)


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = transformers.LlamaConfig(**COMMON, rope_theta=20000.0, rms_norm_eps=1e-5, rope_scaling=scaling,
                                   attn_implementation="eager")
    return _save(tmp_path_factory, "tiny-llama31", transformers.LlamaForCausalLM, cfg)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    cfg = transformers.Qwen2Config(**COMMON, rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   attn_implementation="eager")
    return _save(tmp_path_factory, "tiny-qwen2", transformers.Qwen2ForCausalLM, cfg)


# ---------------------------------------------------------------------------------- the local driver

@dataclass
class Req:
    ids: list[int]                   # the whole sequence, prompt then the fed decode tokens
    prompt_len: int
    arrive: int                      # iteration
    num_cached: int = 0
    table: list[int] = field(default_factory=list)


class Driver:
    """Forms batches by hand (decode first, then chunks of at most `max_chunk` tokens) and runs them."""

    def __init__(self, model: PagedModel, bucket=BUCKET, max_chunk: int = 5, seed: int = 0, compact: bool = True):
        self.model, self.bucket, self.max_chunk, self.compact = model, bucket, max_chunk, compact
        self.free = list(range(model.num_pages))
        random.Random(seed).shuffle(self.free)          # scattered, non-contiguous pages

    def _grow(self, r: Req, num_tokens: int) -> None:
        while len(r.table) * PAGE_SIZE < num_tokens:
            r.table.append(self.free.pop())

    def _slot(self, r: Req, pos: int) -> int:
        return r.table[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE

    def step(self, reqs: list[Req], it: int):
        """One iteration; returns [(req, position)] of each logit row and the logits [rows, V]."""
        live = [r for r in reqs if r.arrive <= it and r.num_cached < len(r.ids)]
        decode = [r for r in live if r.num_cached >= r.prompt_len][:self.bucket.max_decode]
        f = {"input_ids": [], "positions": [], "slot_mapping": [], "context_lens": [], "page_tables": [], "logit_rows": [],
                 "chunk_starts": [], "chunk_lens": [], "prefix_lens": []}
        owners = []
        for r in decode:
            pos = r.num_cached
            self._grow(r, pos + 1)
            f["logit_rows"].append(len(f["input_ids"]))
            f["input_ids"].append(r.ids[pos]); f["positions"].append(pos); f["slot_mapping"].append(self._slot(r, pos))
            f["context_lens"].append(pos + 1); f["page_tables"].append(list(r.table))
            owners.append((r, pos))
        row = len(decode) if self.compact else self.bucket.max_decode
        f["input_ids"] += [0] * (row - len(f["input_ids"]))
        f["positions"] += [0] * (row - len(f["positions"])); f["slot_mapping"] += [-1] * (row - len(f["slot_mapping"]))
        for r in [r for r in live if r.num_cached < r.prompt_len]:
            n = min(self.max_chunk, r.prompt_len - r.num_cached, self.bucket.max_tokens - row)
            if n <= 0 or len(f["chunk_lens"]) == self.bucket.max_segments:
                break
            self._grow(r, r.num_cached + n)
            f["chunk_starts"].append(row); f["chunk_lens"].append(n); f["prefix_lens"].append(r.num_cached)
            f["page_tables"].append(list(r.table))
            for pos in range(r.num_cached, r.num_cached + n):
                f["input_ids"].append(r.ids[pos]); f["positions"].append(pos)
                f["slot_mapping"].append(self._slot(r, pos))
            row += n
            if r.num_cached + n == r.prompt_len:
                f["logit_rows"].append(row - 1)
                owners.append((r, r.prompt_len - 1))
            r.num_cached += n
        for r in decode:
            r.num_cached += 1
        for r in reqs:                                  # finished: pages back to the pool, reused later
            if r.table and r.num_cached == len(r.ids):
                self.free += r.table[::-1]
                r.table = []
        step = make_step_inputs(self.bucket, PAGE_SIZE, "cpu", **f)
        return owners, self.model.logits(step), step


def _hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def _requests(seed: int = 0) -> list[Req]:
    rng = random.Random(seed)
    shapes = [(13, 34, 0), (6, 12, 0), (9, 20, 1), (3, 8, 2), (11, 10, 14)]     # prompt, decode, arrival
    return [Req(ids=[rng.randrange(VOCAB) for _ in range(p + d)], prompt_len=p, arrive=a) for p, d, a in shapes]


def _engine(cfg, folder, num_pages=48):
    weights = load_weights(cfg, folder, device="cpu", dtype=torch.float32)
    return PagedModel(cfg, weights, num_pages=num_pages, page_size=PAGE_SIZE, device="cpu", dtype=torch.float32,
                      max_tokens=BUCKET.max_tokens, max_logit_rows=BUCKET.max_decode + BUCKET.max_segments)


def _teacher_forced_max_diff(hf_model, model, compact=True) -> tuple[float, int, float]:
    reqs = _requests()
    ref = [_hf_logits(hf_model, r.ids) for r in reqs]
    driver = Driver(model, compact=compact)
    worst, num_steps, scale = 0.0, 0, 0.0
    for it in range(200):
        if all(r.num_cached == len(r.ids) for r in reqs):
            break
        owners, logits, _ = driver.step(reqs, it)
        num_steps += 1
        for j, (r, pos) in enumerate(owners):
            want = ref[reqs.index(r)][pos]
            worst = max(worst, float((logits[j] - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
    assert all(r.num_cached == len(r.ids) for r in reqs)
    assert sorted(driver.free) == list(range(model.num_pages))      # every page came back
    return worst, num_steps, scale


@pytest.mark.parametrize("which", ["llama", "llama31", "qwen2"])
def test_teacher_forced_logits_match_transformers(which, request):
    hf_model, folder = request.getfixturevalue(which)
    cfg = load_model_config(folder)
    worst, num_steps, scale = _teacher_forced_max_diff(hf_model, _engine(cfg, folder), compact=which != "qwen2")
    assert num_steps >= 32
    assert scale > 1.0                       # logits large enough for the tolerance to mean something
    assert worst < 1e-3, f"{which}: max |logit diff| {worst}"


def test_wrong_rope_is_caught(llama31):
    """The comparison is sensitive: the same run without llama3 scaling or with another theta fails it."""
    hf_model, folder = llama31
    cfg = load_model_config(folder)
    for wrong in (dataclasses.replace(cfg, rope_scaling=None), dataclasses.replace(cfg, rope_theta=10000.0)):
        worst, _, _ = _teacher_forced_max_diff(hf_model, _engine(wrong, folder))
        assert worst > 1e-2


def test_config_from_folder(llama31, qwen2):
    cfg = load_model_config(llama31[1])
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.rope_scaling.factor) == (20000.0, 1e-5, 4.0)
    assert cfg.architecture == "LlamaForCausalLM" and not cfg.tie_word_embeddings
    q = load_model_config(qwen2[1])
    assert q.tie_word_embeddings and q.spec.has_qkv_bias and q.rope_theta == 50000.0
    assert q.architecture == "Qwen2ForCausalLM"
    weights = load_weights(q, qwen2[1], dtype=torch.float32)
    assert weights.lm_head.data_ptr() == weights.embed.data_ptr()


def test_greedy_decode_through_prev_rows(llama):
    """Decode rows take their input id from the previous forward's sampled ids on the device."""
    hf_model, folder = llama
    cfg = load_model_config(folder)
    model = _engine(cfg, folder)
    prompt = [5, 17, 99, 3, 64, 2, 11]
    table = [7, 2, 30, 15, 41, 9]
    slot = lambda pos: table[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
    n = len(prompt)
    step = make_step_inputs(BUCKET, PAGE_SIZE, "cpu", input_ids=prompt, positions=list(range(n)),
                            slot_mapping=[slot(p) for p in range(n)], chunk_starts=[0], chunk_lens=[n],
                            prefix_lens=[0], page_tables=[table], logit_rows=[n - 1])
    tokens = [int(model.forward(step)[0])]
    for pos in range(n, n + 10):
        step = make_step_inputs(BUCKET, PAGE_SIZE, "cpu", input_ids=[-1], prev_rows=[0], positions=[pos],
                                slot_mapping=[slot(pos)], context_lens=[pos + 1], page_tables=[table], logit_rows=[0])
        tokens.append(int(model.forward(step)[0]))
    ref = _hf_logits(hf_model, prompt + tokens[:-1])[n - 1:]
    chosen = ref.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(chosen, ref.max(dim=1).values, atol=1e-4)      # each token is HF's argmax


def test_step_buffers_match_make_step_inputs():
    fields = {"input_ids": [3, 4, 5], "prev_rows": [-1, 0, -1], "positions": [9, 0, 1], "slot_mapping": [41, 8, 9],
                  "context_lens": [10], "page_tables": [[1, 2, 10], [2]], "chunk_starts": [1], "chunk_lens": [2],
                  "prefix_lens": [0], "logit_rows": [0, 2], "temperature": [0.0, 0.7], "top_p": [1.0, 0.9], "top_k": [0, 5],
                  "seed": [1, -(2 ** 40)], "sample_step": [3, 0]}
    want = make_step_inputs(BUCKET, PAGE_SIZE, "cpu", **fields)
    bufs = StepBuffers(BUCKET, PAGE_SIZE, "cpu")
    bufs.fill_(**dict(fields, input_ids=[7] * 20))
    got = bufs.fill_(**fields)
    assert got is bufs.step and got.num_logit_rows == 2 and not got.is_all_greedy
    for name in ("input_ids", "prev_rows", "positions", "slot_mapping", "context_lens", "page_tables", "logit_rows"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.page_tables.shape == (BUCKET.max_decode + BUCKET.max_segments, 16)
    assert got.page_tables[BUCKET.max_decode].tolist()[:2] == [2, 0]       # the chunk's table after the decode slots
    assert torch.allclose(got.sampling.temperature[:3], torch.tensor([0.0, 0.7, 0.0]))
    assert got.sampling.top_k.tolist()[:2] == [0, 5]


# ---------------------------------------------------------------------------------- sampling

def _params(n, temperature=1.0, top_p=1.0, top_k=0, seed=0, step=None):
    full = lambda v, dt: torch.full((n,), v, dtype=dt)
    return SamplingTensors(temperature=full(temperature, torch.float32), top_p=full(top_p, torch.float32),
                           top_k=full(top_k, torch.int32), seed=full(seed, torch.int32),
                           step=torch.arange(n, dtype=torch.int32) if step is None else full(step, torch.int32))


def _logits(n=64, v=50):
    return torch.randn((n, v), generator=torch.Generator().manual_seed(3)) * 2


def test_greedy_is_argmax():
    logits = _logits()
    want = logits.argmax(dim=1)
    assert torch.equal(sample(logits, _params(64, temperature=0.0)), want)
    assert torch.equal(sample(logits, _params(64, temperature=0.0), is_all_greedy=True), want)
    assert torch.equal(sample(logits, _params(64, top_k=1)), want)               # top_k=1 at temperature 1
    assert torch.equal(sample(logits, _params(64, top_p=1e-6)), want)


def test_seeded_sampling_repeats_and_varies():
    logits = _logits()
    a, b = sample(logits, _params(64, seed=7)), sample(logits, _params(64, seed=7))
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(logits, _params(64, seed=8)))
    assert not torch.equal(a, logits.argmax(dim=1))
    top2 = logits.topk(2, dim=1).indices
    picked = sample(logits, _params(64, seed=5, top_k=2))
    assert bool((top2 == picked[:, None]).any(dim=1).all())


def test_sampling_follows_the_softmax():
    """4000 draws (one per step) from p = (0.25, 0.75): the hash's noise is uniform enough."""
    n = 4000
    logits = torch.log(torch.tensor([[0.25, 0.75]])).expand(n, 2).contiguous()
    frac = float(sample(logits, _params(n, seed=123)).float().mean())
    assert abs(frac - 0.75) < 0.03


# ---------------------------------------------------------------------------------- bad input

def _write_config(folder, **over):
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", **COMMON, rms_norm_eps=1e-5,
               rope_theta=500000.0, eos_token_id=[1, 2])
    cfg.update(over)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_old_style_config_and_generation_eos(tmp_path):
    folder = _write_config(tmp_path / "m", rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192})
    cfg = load_model_config(folder)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0 and cfg.eos_token_ids == (1, 2)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 128009}))
    assert load_model_config(folder / "config.json").eos_token_ids == (128009,)
    bundled = load_model_config("llama-3-8b")
    assert (bundled.rope_theta, bundled.rms_norm_eps, bundled.eos_token_ids) == (500000.0, 1e-5, (128001, 128009))


def test_mistral_window_caps_the_context(tmp_path):
    cfg = load_model_config(_write_config(tmp_path / "m", architectures=["MistralForCausalLM"],
                                          model_type="mistral", sliding_window=32))
    assert cfg.architecture == "MistralForCausalLM" and cfg.max_model_len == 32


@pytest.mark.parametrize("over, message", [
    ({"architectures": ["MixtralForCausalLM"]}, "architecture MixtralForCausalLM is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type yarn is not supported"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_bad_config_is_one_line(tmp_path, over, message):
    with pytest.raises(NfsearchError, match=message) as err:
        load_model_config(_write_config(tmp_path / "m", **over))
    assert "\n" not in str(err.value)


def test_malformed_folder(tmp_path, llama):
    with pytest.raises(NfsearchError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NfsearchError):
        load_model_config(tmp_path)
    folder = _write_config(tmp_path / "noweights")
    cfg = load_model_config(folder)
    with pytest.raises(NfsearchError, match="no \\*.safetensors"):
        load_weights(cfg, folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(NfsearchError, match="not a readable safetensors"):
        load_weights(cfg, folder)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(llama[1] / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(NfsearchError, match="model.layers.1.mlp.up_proj.weight"):
        load_weights(load_model_config(llama[1]), folder)


def test_random_weights_are_deterministic(tmp_path):
    cfg = load_model_config(_write_config(tmp_path / "m"))
    a, b = (load_weights(cfg, None, dtype=torch.float32, seed=3) for _ in range(2))
    c = load_weights(cfg, None, dtype=torch.float32, seed=4)
    assert torch.equal(a.layers[1].wqkv, b.layers[1].wqkv) and not torch.equal(a.layers[1].wqkv, c.layers[1].wqkv)
    assert a.layers[0].wqkv.shape == (64, 64 + 2 * 32) and a.lm_head.shape == (64, VOCAB)

