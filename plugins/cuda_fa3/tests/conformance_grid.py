"""The kernels' own upstream test grids, ported onto our ops, with FlashAttention's error yardstick.

Shared by ``test_conformance.py`` (pytest, ``-m conformance``) and ``benchmarks/conformance_report.py``.

Grids (values read from the upstream files; the code here is ours):

- ``vllm-decode``: vLLM ``tests/kernels/attention/test_flash_attn.py::test_flash_attn_with_paged_kv``
  (the version that still had it): kv_lens [1328, 18, 463] / [1, 54, 293, 70], one query per sequence,
  head pairs (4, 4), (8, 2), (16, 2), block sizes 16/32, fp16/bf16, soft caps None/10/50, sliding windows
  None/256 (vLLM passes ``window_size=(sliding_window - 1, 0)``, causal), num_blocks 32768/2048. Head
  sizes: the brief's 40/72/80/128/256 (the decode test itself had 128/256; the varlen test has all five).
- ``vllm-varlen``: the same file's ``test_varlen_with_paged_kv``: seq_lens [(1, 1328), (5, 18), (129, 463)]
  / [(1, 523), (1, 37), (1, 2011)], head pairs (4, 4), (8, 2), head sizes 40/72/80/128/256, soft caps
  None/50, sliding windows None/256. Upstream runs block size 16 and bf16 only; we add 32 and fp16.
  Both vLLM tests draw block tables with ``randint`` (pages may repeat), as we do.
- ``fa3-kvcache``: FlashAttention ``hopper/test_flash_attn.py::test_flash_attn_kvcache``: its 11 seqlen
  pairs (the 128K ones are commented out upstream), page sizes 1/4/128 (only where seqlen_k % page_size
  == 0, as upstream skips; ``page_size=None`` is ``fa3-kvcache-padded``'s), (causal, local) in
  full/causal/local with a local window ``randint(0, seqlen_k, (2,))`` both sides and causal off,
  MHA/MQA/GQA as 6 heads over 6/1/3, d 128, batch 5, ``cache_seqlens`` ``randint(1, seqlen_k + 1)``,
  varlen q (lengths ``randint(max(1, seqlen_q - 20), seqlen_q + 1)``), bf16; per config every num_splits in
  (0, 1, 3) x pack_gqa in (None, False, True) from one plan, each run twice on that plan (metadata reuse).
  Not covered: new_kv/rotary/batch_idx (our ops take no appended KV), leftpad with a page table (a
  padded plan takes none), fp8, attention_chunk, learnable sinks, d != 128 for this grid.
- ``fa3-kvcache-padded``: the same test's ``page_size=None`` half, through a padded plan
  (``make_attention_plan(cache_seqlens=ends, key_starts=starts)`` and ``bind_attention``'s run; on the
  GPU FA3's batch mode with ``cache_leftpad`` and ``seqused_k``): a contiguous ``[5, seqlen_k, kv_heads,
  128]`` cache read in place, ``has_leftpad`` False/True (``cache_leftpad[i] = randint(0,
  cache_seqlens[i])``, so each row keeps at least one key; False: every start 0, passed as zeros where
  upstream passes None), the same 11 seqlen pairs, masks, head layouts, ``cache_seqlens`` draw, bf16 and 9
  schedules per plan (each run twice). Every row has all ``seqlen_q`` queries (batch mode has no varlen
  q), aligned bottom-right over its ``end - start`` keys: a row with fewer keys than queries gives its
  early queries no key under causal and local masks, and those get zeros (FA3's answer, the reference's
  too). Not covered: varlen q with leftpad (a padded plan takes no ``cu_seqlens_q``), batch_idx,
  new_kv/rotary, strided (transposed) caches (upstream's are contiguous; ``test_fa3_padded_gpu.py``
  covers transposed views), fp8, d != 128.

- ``window-sweep`` (ours, issue 12): the windows the grids above barely touch. Causal (w, 0) and two-sided
  (w, w) windows of widths 31 to 1000 (sliding-window models use 128 to 4096), head dims 64/128/256, MHA and
  GQA, one long sequence and ragged batches of 4, prefill (up to 700 queries) and decode (one query per
  sequence), bf16, page size 16. vllm 0.33.0's FA3 answers some of its prefill configurations wrongly:
  ``known_wrong.py`` reroutes that class, and this family proves the reroute and the decode exemption.

Every case also runs ``varlen_attention_out`` on the same keys packed contiguously (non-paged prefill; a
padded case: every row's queries and its ``start:end`` keys).

Local windows with more than one query per sequence are answered by cuda_fa3's dense torch route on
provider builds its known-wrong table lists (``known_wrong.py``: vllm 0.33.0's FA3): those runs judge that
route (padded rows included), on the same yardstick.

Yardstick (FlashAttention's): with ``ref`` the fp32 torch reference and ``pt`` the same reference run in the
inputs' dtype (scores, softmax and P @ V in low precision, FlashAttention's ``upcast=False, reorder_ops=True``),
ours passes when ``max|ours - ref| <= 2 * max|pt - ref| + 1e-5`` and ``mean|ours - ref| <= 1.5 * mean|pt - ref|``.

The full products are 1440 (vllm-decode), 640 (vllm-varlen), 450 (fa3-kvcache, each with 9 schedules), 198
(fa3-kvcache-padded, 9 schedules each) and 252 (window-sweep) configurations; a seeded sample of each
(:data:`SAMPLE`: 240/200/160/60/120) runs by default, every axis value still appearing.
``ATTN_DISPATCH_CONFORMANCE=full`` runs every configuration.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass

import torch
from attn_dispatch.plans import AttentionParams

SAMPLE = {"vllm-decode": 240, "vllm-varlen": 200, "fa3-kvcache": 160, "fa3-kvcache-padded": 60, "window-sweep": 120}  # configurations per family by default


@dataclass(frozen=True)
class Case:
    """One configuration: sequences, shapes and every AttentionParams to run from one plan."""

    family: str
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    dtype: torch.dtype
    schedules: tuple[AttentionParams, ...]
    repeat_pages: bool  # vLLM's randint block tables (pages may repeat) vs FlashAttention's randperm
    seed: int
    # A padded case (a contiguous [B, seqlen_k, kv_heads, d] cache read in place, FA3's batch mode): each
    # row's first key; ``k_lens`` are then each row's key end (the plan's ``cache_seqlens``) and every row
    # has ``q_lens[0]`` queries. None: a paged case (``page_size``/``num_pages`` describe its cache).
    key_starts: tuple[int, ...] | None = None
    seqlen_k: int = 0  # a padded case's cache length S_k (the plan's max_seqlen_k), >= every key end

    @property
    def padded(self) -> bool:
        return self.key_starts is not None

    def describe(self, params: AttentionParams | None = None) -> str:
        p = params or self.schedules[0]
        window = "" if p.window_size == (-1, -1) else f" window={p.window_size}"
        softcap = f" softcap={p.softcap:g}" if p.softcap else ""
        sched = "" if params is None else f" splits={p.num_splits} pack_gqa={p.pack_gqa}"
        q = list(self.q_lens) if len(set(self.q_lens)) > 1 else f"{self.q_lens[0]}x{len(self.q_lens)}"
        if self.padded:  # keys start:end of a contiguous cache of seqlen_k
            spans = ", ".join(f"{s}:{e}" for s, e in zip(self.key_starts, self.k_lens))
            keys = f"[{spans}]" if any(self.key_starts) else list(self.k_lens)
            cache = f"cache={self.seqlen_k} leftpad={any(self.key_starts)}"
        else:
            keys, cache = list(self.k_lens), f"page={self.page_size} pages={self.num_pages}"
        return (
            f"{self.family} q={q} k={keys} heads={self.heads}/{self.kv_heads} d={self.head_dim} "
            f"{cache} {str(self.dtype).removeprefix('torch.')} causal={p.causal}{window}{softcap}{sched}"
        )


def _vllm_cases() -> dict[str, list[Case]]:
    decode, varlen = [], []
    dtypes = (torch.float16, torch.bfloat16)
    for kv_lens, heads, d, page, dtype, cap, window, pages in itertools.product(
        ([1328, 18, 463], [1, 54, 293, 70]), ((4, 4), (8, 2), (16, 2)), (40, 72, 80, 128, 256), (16, 32),
        dtypes, (None, 10.0, 50.0), (None, 256), (32768, 2048),
    ):  # fmt: skip
        params = _vllm_params(cap, window)
        decode.append(Case("vllm-decode", (1,) * len(kv_lens), tuple(kv_lens), *heads, d, page, pages, dtype, (params,), True, 0))
    for seq_lens, heads, d, page, dtype, cap, window, pages in itertools.product(
        ([(1, 1328), (5, 18), (129, 463)], [(1, 523), (1, 37), (1, 2011)]), ((4, 4), (8, 2)), (40, 72, 80, 128, 256),
        (16, 32), dtypes, (None, 50.0), (None, 256), (32768, 2048),
    ):  # fmt: skip
        q_lens, k_lens = zip(*seq_lens)
        params = _vllm_params(cap, window)
        varlen.append(Case("vllm-varlen", q_lens, k_lens, *heads, d, page, pages, dtype, (params,), True, 0))
    return {"vllm-decode": decode, "vllm-varlen": varlen}


def _vllm_params(softcap: float | None, sliding_window: int | None) -> AttentionParams:
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    return AttentionParams(causal=True, window_size=window, softcap=softcap or 0.0)


FA3_SEQLENS = [(1, 128), (1, 339), (3, 1024), (64, 800), (64, 256), (3, 799), (64, 2048), (16, 20000), (128, 128), (256, 512), (2048, 3577)]


def _fa3_cases() -> list[Case]:
    cases = []
    batch, heads = 5, 6
    for index, ((seqlen_q, seqlen_k), page, mask, kv_heads, varlen_q) in enumerate(itertools.product(
        FA3_SEQLENS, (1, 4, 128), ("full", "causal", "local"), (6, 1, 3), (False, True),
    )):  # fmt: skip
        if seqlen_k % page:
            continue  # upstream skips these
        rng = random.Random(index)  # fixes this case's random draws (lengths, window) in its description
        q_lens = tuple(rng.randint(max(1, seqlen_q - 20), seqlen_q) if varlen_q else seqlen_q for _ in range(batch))
        k_lens = tuple(rng.randint(1, seqlen_k) for _ in range(batch))
        window = (rng.randrange(seqlen_k), rng.randrange(seqlen_k)) if mask == "local" else (-1, -1)
        base = dict(causal=mask == "causal", window_size=window)
        schedules = tuple(
            AttentionParams(**base, num_splits=s, pack_gqa=g) for s, g in itertools.product((0, 1, 3), (None, False, True))
        )
        pages = -(-seqlen_k // page) * batch * 3  # upstream's num_blocks
        cases.append(Case("fa3-kvcache", q_lens, k_lens, heads, kv_heads, 128, page, pages, torch.bfloat16, schedules, False, index))
    return cases


def _fa3_padded_cases() -> list[Case]:
    """test_flash_attn_kvcache's ``page_size=None`` half: a contiguous cache, each row's keys
    ``[leftpad, cache_seqlens)`` (``has_leftpad`` False: from 0), every row's ``seqlen_q`` queries."""
    cases = []
    batch, heads = 5, 6
    for index, ((seqlen_q, seqlen_k), mask, kv_heads, leftpad) in enumerate(itertools.product(
        FA3_SEQLENS, ("full", "causal", "local"), (6, 1, 3), (False, True),
    )):  # fmt: skip
        rng = random.Random(f"fa3-kvcache-padded/{index}")  # this case's draws (key ends, starts, window)
        ends = tuple(rng.randint(1, seqlen_k) for _ in range(batch))  # upstream's cache_seqlens
        starts = tuple(rng.randrange(end) if leftpad else 0 for end in ends)  # its cache_leftpad: start < end
        window = (rng.randrange(seqlen_k), rng.randrange(seqlen_k)) if mask == "local" else (-1, -1)
        base = dict(causal=mask == "causal", window_size=window)
        schedules = tuple(
            AttentionParams(**base, num_splits=s, pack_gqa=g) for s, g in itertools.product((0, 1, 3), (None, False, True))
        )
        cases.append(Case(
            "fa3-kvcache-padded", (seqlen_q,) * batch, ends, heads, kv_heads, 128, 0, 0, torch.bfloat16, schedules,
            False, index, key_starts=starts, seqlen_k=seqlen_k,
        ))  # fmt: skip
    return cases


def _window_cases() -> list[Case]:
    cases = []
    batches = {
        "one": ((651,), (651,)),
        "ragged": ((396, 1, 165, 700), (632, 300, 1150, 700)),
        "decode": ((1, 1, 1, 1), (1328, 18, 463, 1000)),
    }
    for index, (width, two_sided, d, heads, batch) in enumerate(itertools.product(
        (31, 100, 176, 255, 300, 500, 1000), (False, True), (64, 128, 256), ((8, 8), (16, 4)), batches,
    )):  # fmt: skip
        q_lens, k_lens = batches[batch]
        params = AttentionParams(causal=not two_sided, window_size=(width, width if two_sided else 0))
        pages = len(k_lens) * -(-max(k_lens) // 16) + 4
        cases.append(Case("window-sweep", q_lens, k_lens, *heads, d, 16, pages, torch.bfloat16, (params,), False, index))
    return cases


def cases(family: str | None = None) -> list[Case]:
    """The configurations to run: a seeded sample per family, or all under ATTN_DISPATCH_CONFORMANCE=full."""
    every = {**_vllm_cases(), "fa3-kvcache": _fa3_cases(), "fa3-kvcache-padded": _fa3_padded_cases(), "window-sweep": _window_cases()}
    full = os.environ.get("ATTN_DISPATCH_CONFORMANCE", "") == "full"
    chosen = []
    for name, grid in every.items():
        if family not in (None, name):
            continue
        keep = grid if full or len(grid) <= SAMPLE[name] else random.Random(name).sample(grid, SAMPLE[name])
        chosen += keep
    return chosen


def grid_sizes() -> dict[str, int]:
    """Full product size of each family (after upstream's own skips)."""
    return {
        **{k: len(v) for k, v in _vllm_cases().items()}, "fa3-kvcache": len(_fa3_cases()),
        "fa3-kvcache-padded": len(_fa3_padded_cases()), "window-sweep": len(_window_cases()),
    }  # fmt: skip


@dataclass
class Batch:
    q: torch.Tensor  # [tokens, heads, d]; padded: [B, S_q, heads, d]
    k_cache: torch.Tensor  # [pages, page_size, kv_heads, d]; padded: the contiguous cache [B, S_k, kv_heads, d]
    v_cache: torch.Tensor
    page_table: torch.Tensor | None  # [batch, columns] int32; None when padded
    plan_args: dict  # make_attention_plan's keyword arguments, layer_params aside
    packed: dict  # varlen_attention_out's k, v and keyword arguments (the same keys, contiguous)


def make_batch(case: Case, device: str | torch.device = "cuda") -> Batch:
    """Random inputs for ``case`` on ``device`` (N(0, 1) values, as upstream draws them)."""
    if case.padded:
        return _make_padded_batch(case, device)
    g = torch.Generator(device=device).manual_seed(case.seed)
    batch, ps = len(case.q_lens), case.page_size
    columns = -(-max(case.k_lens) // ps)
    cache_shape = (case.num_pages, ps, case.kv_heads, case.head_dim)
    k_cache = torch.randn(cache_shape, generator=g, device=device, dtype=case.dtype)
    v_cache = torch.randn(cache_shape, generator=g, device=device, dtype=case.dtype)
    if case.repeat_pages:
        table = torch.randint(0, case.num_pages, (batch, columns), generator=g, device=device)
    else:
        table = torch.randperm(case.num_pages, generator=g, device=device)[: batch * columns].view(batch, columns)
    table = table.to(torch.int32)
    q = torch.randn(sum(case.q_lens), case.heads, case.head_dim, generator=g, device=device, dtype=case.dtype)
    cu_q = _cumulative(case.q_lens, device)
    plan_args = dict(
        cache_seqlens=torch.tensor(case.k_lens, dtype=torch.int32, device=device), page_table=table,
        cu_seqlens_q=cu_q, max_seqlen_q=max(case.q_lens), max_seqlen_k=max(case.k_lens), page_size=ps,
        num_heads=case.heads, num_kv_heads=case.kv_heads, head_dim=case.head_dim, dtype=case.dtype,
    )  # fmt: skip
    keys = [gather_keys(k_cache, v_cache, table, b, n) for b, n in enumerate(case.k_lens)]
    packed = dict(
        k=torch.cat([k for k, _ in keys]), v=torch.cat([v for _, v in keys]), cu_seqlens_q=cu_q,
        cu_seqlens_k=_cumulative(case.k_lens, device), max_seqlen_q=max(case.q_lens), max_seqlen_k=max(case.k_lens),
    )  # fmt: skip
    return Batch(q, k_cache, v_cache, table, plan_args, packed)


def _make_padded_batch(case: Case, device) -> Batch:
    """A padded case's inputs: q ``[B, S_q, heads, d]``, contiguous caches ``[B, S_k, kv_heads, d]`` (as
    upstream's ``page_size=None``), the plan's key ends and starts; packed: every query, each row's keys."""
    g = torch.Generator(device=device).manual_seed(case.seed)
    batch, seqlen_q = len(case.q_lens), case.q_lens[0]
    cache_shape = (batch, case.seqlen_k, case.kv_heads, case.head_dim)
    k_cache = torch.randn(cache_shape, generator=g, device=device, dtype=case.dtype)
    v_cache = torch.randn(cache_shape, generator=g, device=device, dtype=case.dtype)
    q = torch.randn(batch, seqlen_q, case.heads, case.head_dim, generator=g, device=device, dtype=case.dtype)
    plan_args = dict(
        cache_seqlens=torch.tensor(case.k_lens, dtype=torch.int32, device=device),
        key_starts=torch.tensor(case.key_starts, dtype=torch.int32, device=device), max_seqlen_q=seqlen_q,
        max_seqlen_k=case.seqlen_k, num_heads=case.heads, num_kv_heads=case.kv_heads, head_dim=case.head_dim,
        dtype=case.dtype,
    )  # fmt: skip
    counts = [end - start for start, end in zip(case.key_starts, case.k_lens)]
    packed = dict(
        k=torch.cat([k_cache[b, s:e] for b, (s, e) in enumerate(zip(case.key_starts, case.k_lens))]),
        v=torch.cat([v_cache[b, s:e] for b, (s, e) in enumerate(zip(case.key_starts, case.k_lens))]),
        cu_seqlens_q=_cumulative(case.q_lens, device), cu_seqlens_k=_cumulative(counts, device),
        max_seqlen_q=seqlen_q, max_seqlen_k=max(counts),
    )  # fmt: skip
    return Batch(q, k_cache, v_cache, None, plan_args, packed)


def gather_keys(k_cache, v_cache, table, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence ``b``'s first ``length`` keys and values, ``[length, kv_heads, d]``."""
    pages = table[b, : -(-length // k_cache.shape[1])].long()
    return k_cache[pages].flatten(0, 1)[:length], v_cache[pages].flatten(0, 1)[:length]


def _cumulative(lengths, device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)


def reference(case: Case, batch: Batch, params: AttentionParams, *, upcast: bool) -> torch.Tensor:
    """Plain torch attention, ``[tokens, heads, d]`` (padded: ``[B * S_q, heads, d]``, row-major): fp32
    throughout when ``upcast``, else in the inputs' dtype (scale folded into k, softmax output and P @ V in
    that dtype, as FlashAttention's ``pt``).

    Bottom-right aligned causal mask and window, softcap, zeros for a query with no visible key (as FA3
    writes them, and FlashAttention's ``attention_ref``: a padded row with fewer keys than queries).
    """
    scale, group = case.head_dim**-0.5, case.heads // case.kv_heads
    outs = []
    for q, k, v in sequences(case, batch):
        lq, lk = q.shape[0], k.shape[0]
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q * scale, k) if upcast else torch.einsum("qhd,khd->hqk", q, k * scale)
        if params.softcap > 0:
            scores = params.softcap * torch.tanh(scores / params.softcap)
        scores = scores.masked_fill(~visible(lq, lk, params, q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)  # no visible key: zeros
        outs.append(torch.einsum("hqk,khd->qhd", probs, v))
    return torch.cat(outs)


def sequences(case: Case, batch: Batch):
    """Each sequence's queries ``[Lq, heads, d]`` and keys and values ``[Lk, kv_heads, d]``, in order: a
    paged case's through its page table, a padded case's row ``b`` of q and keys ``key_starts[b]:k_lens[b]``
    of its cache row."""
    if case.padded:
        for b, (start, end) in enumerate(zip(case.key_starts, case.k_lens)):
            yield batch.q[b], batch.k_cache[b, start:end], batch.v_cache[b, start:end]
        return
    start = 0
    for b, (lq, lk) in enumerate(zip(case.q_lens, case.k_lens)):
        yield batch.q[start : start + lq], *gather_keys(batch.k_cache, batch.v_cache, batch.page_table, b, lk)
        start += lq


def visible(lq: int, lk: int, params: AttentionParams, device) -> torch.Tensor:
    """``[lq, lk]``: query i sees key j (causal/window aligned bottom-right: query i sits at key i + lk - lq)."""
    diagonal = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    left, right = params.window_size
    right = 0 if params.causal else right
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= diagonal + right
    if left >= 0:
        ok &= j >= diagonal - left
    return ok


@dataclass
class Outcome:
    """One op x schedule of a case, against the fp32 reference (``ref_*``: the low-precision reference's own error)."""

    case: Case
    op: str  # "paged" (a padded case: "padded") or "packed"
    params: AttentionParams
    max_err: float
    mean_err: float
    ref_max_err: float
    ref_mean_err: float
    reuse_equal: bool  # the second call on the same plan gave the same bytes
    error: str = ""  # the op raised

    @property
    def ok(self) -> bool:
        return not self.error and self.reuse_equal and within_yardstick(self.max_err, self.mean_err, self.ref_max_err, self.ref_mean_err)

    def line(self) -> str:
        if self.error:
            return f"{self.op} {self.case.describe(self.params)}: raised {self.error}"
        return (
            f"{self.op} {self.case.describe(self.params)}: max {self.max_err:.3g} (allowed {2 * self.ref_max_err + 1e-5:.3g}) "
            f"mean {self.mean_err:.3g} (allowed {1.5 * self.ref_mean_err:.3g}){'' if self.reuse_equal else ' REUSE DIFFERS'}"
        )


def within_yardstick(max_err: float, mean_err: float, ref_max: float, ref_mean: float) -> bool:
    return max_err <= 2 * ref_max + 1e-5 and mean_err <= 1.5 * ref_mean


def error(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    diff = (out.float() - exact).abs()
    return diff.max().item() if diff.numel() else 0.0, diff.mean().item() if diff.numel() else 0.0


def run_case(ops, case: Case, device: str | torch.device = "cuda", batch: Batch | None = None) -> list[Outcome]:
    """Every schedule of ``case`` through ``ops`` (paged, or a padded case's bound run, then packed), twice
    each on one plan. ``batch``: the inputs, when the caller made them with :func:`make_batch` (to reuse them)."""
    batch = make_batch(case, device) if batch is None else batch
    tokens, dv = sum(case.q_lens), case.head_dim
    plan = ops.make_attention_plan(**batch.plan_args, layer_params=case.schedules)
    outcomes, references = [], {}
    for params in case.schedules:
        mask = (params.causal, params.window_size, params.softcap)  # the schedule does not change the answer
        if mask not in references:
            exact = reference(case, batch, params, upcast=True)
            references[mask] = exact, *error(reference(case, batch, params, upcast=False), exact)
        exact, ref_max, ref_mean = references[mask]
        name, layer_call = ("padded", _padded_call) if case.padded else ("paged", _paged_call)
        calls = {name: layer_call(ops, batch, plan, params), "packed": _packed_call(ops, batch, params)}
        for op, call in calls.items():
            shape = (len(case.q_lens), case.q_lens[0], case.heads, dv) if op == "padded" else (tokens, case.heads * dv)
            outs = [torch.full(shape, 7.0, dtype=case.dtype, device=device) for _ in range(2)]
            try:
                for out in outs:
                    call(out)
            except Exception as exc:  # a refusal is a finding too: report it with the configuration
                raised = f"{type(exc).__name__}: {exc}"
                outcomes.append(Outcome(case, op, params, math.inf, math.inf, ref_max, ref_mean, False, raised))
                continue
            max_err, mean_err = error(outs[0].view(tokens, case.heads, dv), exact)
            outcomes.append(Outcome(case, op, params, max_err, mean_err, ref_max, ref_mean, torch.equal(*outs)))
    return outcomes


def _paged_call(ops, batch: Batch, plan, params: AttentionParams):
    def call(out: torch.Tensor) -> None:
        ops.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params)

    return call


def _padded_call(ops, batch: Batch, plan, params: AttentionParams):
    """A padded plan's layer: bound by the first call (once per step and params, as an engine binds), then
    run per layer over the caches in place."""
    bound = []

    def call(out: torch.Tensor) -> None:
        if not bound:
            bound.append(ops.bind_attention(plan, params=params))
        bound[0](batch.q, batch.k_cache, batch.v_cache, out)

    return call


def _packed_call(ops, batch: Batch, params: AttentionParams):
    lengths = {k: w for k, w in batch.packed.items() if k not in ("k", "v")}
    q = batch.q.flatten(0, 1) if batch.q.dim() == 4 else batch.q  # a padded batch's queries, all of them valid

    def call(out: torch.Tensor) -> None:
        ops.varlen_attention_out(q, batch.packed["k"], batch.packed["v"], out, params=params, **lengths)

    return call
