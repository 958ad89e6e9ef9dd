"""MoE token-to-expert kernels against their baselines, in one run.

Run:  .venv/bin/pytest bench/bench_moe_kernels.py --benchmark-columns=min,median,rounds

Every path moves the same tokens by the same routing (k = 2, capacity
factor 1.0) with the experts left out (identity), so only the data movement
differs:

- ours: ``alltoall.moe.dispatch`` then ``combine`` (torch.ops.alltoall.moe_*);
- torch index ops: ``index_put`` into the padded buffer, ``index_add`` back;
- einsum: GShard/DeepSpeed's one-hot ``sec,sm->ecm`` and ``sec,ecm->sm``;
- DeepSpeed's index-op path (``_sparse_encode`` / ``_sparse_decode``), when
  deepspeed is installed (``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed``);
- floors: ``index_select`` of the assigned rows (dispatch's reads), and a
  copy (``clone``) of as many bytes as dispatch and combine write.

Gate + dispatch + combine is also timed against DeepSpeed's ``TopKGate``
with ``sparse_routes=True`` (second-expert sampling off). The summary at the
end gives the ratios (min times of this run) and GB/s.

Allocation: every path allocates its outputs, and glibc serves blocks over
32 MB with fresh mmap pages, so at S=8192 the page faults (kernel zeroing)
cost more than the copies and hide the kernels. The module therefore makes
glibc keep freed memory (``mallopt``), as a caching allocator would; set
``ALLTOALL_BENCH_SYSTEM_MALLOC=1`` to measure with glibc's defaults.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

from alltoall.moe import TopKGate, combine, dispatch, expert_capacity


def _keep_freed_memory() -> bool:
    if os.environ.get("ALLTOALL_BENCH_SYSTEM_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31))


KEEPS_FREED_MEMORY = _keep_freed_memory()
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NEEDS_DEEPSPEED = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (optional bench baseline: "
                                     "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)")


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    experts: int
    k: int

    @property
    def name(self) -> str:
        return f"S{self.tokens}-M{self.hidden}-E{self.experts}-k{self.k}"


SHAPES = [Shape(8192, 1024, 64, 2), Shape(2048, 512, 16, 2)]


class Case:
    """Inputs and one routing for a shape, built once."""

    def __init__(self, shape: Shape) -> None:
        g = torch.Generator().manual_seed(0)
        self.shape = shape
        self.x = torch.randn(shape.tokens, shape.hidden, generator=g)
        self.gate = TopKGate(shape.hidden, shape.experts, shape.k)
        self.capacity = expert_capacity(shape.tokens, shape.experts, shape.k, 1.0, 4)
        out = self.gate(self.x, self.capacity)
        self.routing = out.routing
        self.weights = out.weights.detach()
        self.rows = dispatch(self.x, self.routing)
        self.expected = combine(self.rows, self.routing, self.weights)
        kept = self.routing.dest_row >= 0
        self.token_of, self.choice_of = kept.nonzero(as_tuple=True)
        self.dest_of = self.routing.dest_row[kept]
        # The token of every filled buffer row, in buffer order: dispatch's reads.
        self.assigned = self.routing.source[self.routing.source >= 0] // shape.k
        written = (self.routing.num_rows + shape.tokens) * shape.hidden
        self.copy_src = torch.randn(written)


_cases: dict[Shape, Case] = {}
_times: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.name)
def case(request) -> Case:
    if request.param not in _cases:
        _cases.clear()  # one shape's buffers at a time
        _cases[request.param] = Case(request.param)
    return _cases[request.param]


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _times:
        return
    with capture.global_and_fixture_disabled():
        _write_summary(reporter.write_line)


def _write_summary(write) -> None:
    write("")
    allocator = "freed memory kept (mallopt)" if KEEPS_FREED_MEMORY else "glibc malloc defaults"
    write(f"MoE kernels: min times of this run, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{allocator}")
    for shape in SHAPES:
        t = {path: v for (name, path), v in _times.items() if name == shape.name}
        if "ours" not in t:
            continue
        written = expert_capacity(shape.tokens, shape.experts, shape.k, 1.0, 4) * shape.experts + shape.tokens
        gb = written * shape.hidden * 4 / 1e9
        line = f"  {shape.name}: dispatch+combine {t['ours'] * 1e3:.2f} ms, {gb / t['ours']:.1f} GB/s written"
        if "memcpy" in t:
            line += f" (memcpy of the same bytes: {t['memcpy'] * 1e3:.2f} ms, {gb / t['memcpy']:.1f} GB/s)"
        write(line)
        for path, label in [("memcpy", "memcpy"), ("index_select", "index_select")]:
            if path in t:
                write(f"    {label + ' floor':<26} {t[path] * 1e3:9.2f} ms   ours / floor = {t['ours'] / t[path]:6.2f}")
        for path, label in [("torch_index", "torch index ops"), ("deepspeed", "DeepSpeed encode+decode"),
                            ("einsum", "one-hot einsums")]:
            if path in t:
                write(f"    {label:<26} {t[path] * 1e3:9.2f} ms   ours is {t[path] / t['ours']:8.1f}x faster")
        if "ours_gate" in t:
            line = f"    gate+dispatch+combine: ours {t['ours_gate'] * 1e3:.2f} ms"
            if "deepspeed_gate" in t:
                line += (f", DeepSpeed {t['deepspeed_gate'] * 1e3:.2f} ms, ours / DeepSpeed = "
                         f"{t['ours_gate'] / t['deepspeed_gate']:.3f}")
            write(line)


def _record(benchmark, case: Case, path: str) -> None:
    _times[(case.shape.name, path)] = benchmark.stats.stats.min


# Floors ----------------------------------------------------------------------


def test_memcpy(benchmark, case):
    # A fresh output, as every path below allocates its own.
    benchmark(torch.clone, case.copy_src)
    _record(benchmark, case, "memcpy")


def test_index_select_floor(benchmark, case):
    benchmark(case.x.index_select, 0, case.assigned)
    _record(benchmark, case, "index_select")


# Dispatch + combine ------------------------------------------------------------


def _ours(case: Case) -> torch.Tensor:
    return combine(dispatch(case.x, case.routing), case.routing, case.weights)


def test_ours(benchmark, case):
    assert torch.equal(benchmark(_ours, case), case.expected)
    _record(benchmark, case, "ours")


def _torch_index(case: Case) -> torch.Tensor:
    rows = case.x.new_zeros(case.routing.num_rows, case.shape.hidden)
    rows[case.dest_of] = case.x[case.token_of]
    scaled = rows[case.dest_of] * case.weights[case.token_of, case.choice_of][:, None]
    return torch.zeros_like(case.x).index_add_(0, case.token_of, scaled)


def test_torch_index_ops(benchmark, case):
    torch.testing.assert_close(benchmark(_torch_index, case), case.expected)
    _record(benchmark, case, "torch_index")


def _one_hot(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline's [S, E, C] combine weights and dispatch mask."""
    s, e, c = case.shape.tokens, case.shape.experts, case.capacity
    combine_sec = torch.zeros(s, e * c)
    combine_sec[case.token_of, case.dest_of] = case.weights[case.token_of, case.choice_of]
    combine_sec = combine_sec.view(s, e, c)
    return combine_sec, combine_sec.ne(0).to(case.x.dtype)


def test_einsum(benchmark, case):
    combine_sec, dispatch_sec = _one_hot(case)

    def einsums():
        ecm = torch.einsum("sec,sm->ecm", dispatch_sec, case.x)
        return torch.einsum("sec,ecm->sm", combine_sec, ecm)

    rounds = 2 if case.shape.tokens * case.shape.experts * case.capacity > 2**26 else 5
    out = benchmark.pedantic(einsums, rounds=rounds, iterations=1, warmup_rounds=0)
    torch.testing.assert_close(out, case.expected, rtol=1e-4, atol=1e-4)
    _record(benchmark, case, "einsum")


@NEEDS_DEEPSPEED
def test_deepspeed_encode_decode(benchmark, case):
    from deepspeed.moe.sharded_moe import _sparse_decode, _sparse_encode

    e, c = case.shape.experts, case.capacity
    scratch = torch.full_like(case.routing.dest_row, e * c)
    slots = torch.where(case.routing.dest_row >= 0, case.routing.dest_row, scratch).t().contiguous()
    gates = case.weights.t().contiguous()

    def encode_decode():
        rows = _sparse_encode(case.x, slots, e, c)
        return _sparse_decode(rows.view(e * c, -1), slots, gates, case.shape.tokens)

    torch.testing.assert_close(benchmark(encode_decode), case.expected)
    _record(benchmark, case, "deepspeed")


# Gate + dispatch + combine --------------------------------------------------------


def test_ours_gate_dispatch_combine(benchmark, case):
    def run():
        with torch.no_grad():
            out = case.gate(case.x, case.capacity)
            return combine(dispatch(case.x, out.routing), out.routing, out.weights)

    benchmark(run)
    _record(benchmark, case, "ours_gate")


@NEEDS_DEEPSPEED
def test_deepspeed_gate_dispatch_combine(benchmark, case):
    from deepspeed.moe.sharded_moe import TopKGate as DeepSpeedGate
    from deepspeed.moe.sharded_moe import _route_slots, _sparse_decode, _sparse_encode

    s, m = case.shape.tokens, case.shape.hidden
    gate = DeepSpeedGate(m, case.shape.experts, k=case.shape.k, capacity_factor=1.0, min_capacity=4,
                         top2_2nd_expert_sampling=False)
    with torch.no_grad():
        gate.wg.weight.copy_(case.gate.wg.weight)

    def run():
        with torch.no_grad():
            _, c, e, indices, locations, gates, _ = gate(case.x, None, True)
            c = int(c)
            slots = _route_slots(indices, locations, e, c)
            rows = _sparse_encode(case.x, slots, e, c)
            return _sparse_decode(rows.view(e * c, m), slots, gates, s)

    out = benchmark(run)
    assert out.shape == (s, m)
    _record(benchmark, case, "deepspeed_gate")
