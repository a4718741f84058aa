"""Generic multiple-choice log-likelihood scoring with a shared-prefix KV cache.

Input: requests, each a ``context`` and a list of ``continuations`` (strings). Output, per request:
the summed log-likelihood of each continuation given the context, its token count and its UTF-8
byte length (so a caller can length-normalise), and the first argmax. Nothing here knows a
benchmark; a task (``mmlu.py``) builds the strings and aggregates.

Scoring is lm-eval's ``loglikelihood`` (``HFLM._encode_pair`` + one causal forward):

* trailing whitespace of the context moves to the continuation; ``context_enc = enc(context)``,
  ``continuation_enc = enc(context + continuation)[len(context_enc):]``, where ``enc`` uses the
  tokenizer's default special tokens unless the text already starts with the BOS string
  (``HFLM.tok_encode`` with ``add_bos_token=None``);
* the log-likelihood is the sum of ``log_softmax`` (float32) over the continuation tokens.

Speed: requests carry a ``group`` key; within a group the longest common prefix of the *token ids*
of all contexts (not of the strings: BPE merges across a boundary differ) is run once and its KV
cache reused by every row of the group, so only each context's suffix and the continuation are
run. When all continuations of a request are single tokens (``" A"`` .. ``" D"``), one row
scores them all from the last position's logits; otherwise each continuation gets its own row.
Rows are batched longest-first with bounded padding. The group only decides what is cached: the
scores do not depend on it beyond float rounding (a request in the "wrong" group is just slower).

Second cache level (packed path): rows whose suffixes start with the same >= 32 tokens form a
cluster (:func:`_plan_clusters`), whose shared segment is run once, after the prefix, and attended
to from its KV. Real MMLU history subjects put 2-5 questions on one reading passage (european
history: 165 questions on 60 passages), and a cloze request's choice rows share the whole question,
so this removes about half the tokens the one-level cache still ran there.

Long prompts (CPU, SDPA models): a batch's rows are packed into one unpadded sequence, and
attention is split in two exact parts whose softmaxes are merged by their log-sum-exp: every
query of the batch against the shared prefix KV at once (one unmasked kernel call, prefix never
copied per row), and each row causally against its own suffix. The plain path (prefix KV
expanded into a per-batch ``DynamicCache``, rows left-padded, a materialised [B, 1, S, P+S] mask)
spent ~40% of a 3k-token prompt's time there: masked attention over prefix + suffix (~27%), the
per-batch copy of the prefix KV (``cat``, ~8%) and building the mask (~3%); the rest is the
linear layers, which no cache avoids. It stays as the fallback for other devices and models.

Processes: work is sharded by whole batches (``align.distributed.mine``, batch ``b`` of the run
to rank ``b mod world``), each batch computed exactly as one process computes it, and the
results gathered once at the end, so every rank returns the one-process result.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from align import distributed

# --------------------------------------------------------------------------- requests / results


@dataclass(frozen=True)
class ChoiceRequest:
    """Score each of ``continuations`` after ``context``; requests with the same ``group`` share
    one prefix KV cache (give every request that starts with the same few-shot block one key)."""

    context: str
    continuations: tuple[str, ...]
    group: Hashable = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "continuations", tuple(self.continuations))
        if not self.continuations:
            raise ValueError("a ChoiceRequest needs at least one continuation")


@dataclass(frozen=True)
class ChoiceScores:
    """Per continuation: summed log-likelihood, number of scored tokens, UTF-8 bytes of the string."""

    loglikelihoods: tuple[float, ...]
    num_tokens: tuple[int, ...]
    num_bytes: tuple[int, ...]

    @property
    def prediction(self) -> int:
        """Index of the highest summed log-likelihood (first on ties, like ``np.argmax``)."""
        return argmax(self.loglikelihoods)


def argmax(values: Sequence[float]) -> int:
    """First index of the maximum (ties: the lowest index, like ``np.argmax``)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def length_normalized(loglikelihoods: Sequence[float], lengths: Sequence[float]) -> list[float]:
    """``ll / length`` per choice (lm-eval's ``acc_norm`` / ``acc_bytes`` when ``lengths`` are the
    characters / UTF-8 bytes of the choice strings); a zero length gives ``-inf`` (never chosen
    unless every choice has it)."""
    return [ll / n if n else -math.inf for ll, n in zip(loglikelihoods, lengths, strict=True)]


# --------------------------------------------------------------------------- tokenization


def _bos_string(tokenizer: Any) -> str | None:
    """lm-eval's ``prefix_token_id`` decoded (BOS, else EOS)."""
    tok_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return tokenizer.decode([tok_id]) if tok_id is not None else None


def _encode_many(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool | None) -> list[list[int]]:
    """Batch version of lm-eval ``HFLM.tok_encode`` (``add_special_tokens`` = its ``add_bos_token``)."""
    bos = _bos_string(tokenizer) if add_special_tokens is None else None
    groups: dict[bool | None, list[int]] = {}
    for i, t in enumerate(texts):
        flag = add_special_tokens
        if flag is None and bos and t.startswith(bos):
            flag = False
        groups.setdefault(flag, []).append(i)
    out: list[list[int]] = [[] for _ in texts]
    for flag, idx in groups.items():
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        enc = tokenizer([texts[i] for i in idx], **kwargs)["input_ids"]
        for i, ids in zip(idx, enc, strict=True):
            out[i] = list(ids)
    return out


def encode_pairs(
    tokenizer: Any,
    contexts: Sequence[str],
    continuation_sets: Sequence[Sequence[str]],
    add_special_tokens: bool | None = None,
) -> list[tuple[list[int], list[list[int]]]]:
    """lm-eval ``_encode_pair`` for each context and each of its continuations."""
    ctx_texts, whole_texts = [], []
    for ctx, conts in zip(contexts, continuation_sets, strict=True):
        n_spaces = len(ctx) - len(ctx.rstrip())
        moved = ctx[len(ctx) - n_spaces :] if n_spaces else ""
        base = ctx[: len(ctx) - n_spaces] if n_spaces else ctx
        ctx_texts.append(base)
        whole_texts.extend(base + moved + c for c in conts)
    ctx_ids = _encode_many(tokenizer, ctx_texts, add_special_tokens)
    whole_ids = _encode_many(tokenizer, whole_texts, add_special_tokens)
    out, k = [], 0
    for ids, conts in zip(ctx_ids, continuation_sets, strict=True):
        cont_ids = [whole_ids[k + j][len(ids) :] for j in range(len(conts))]
        k += len(conts)
        if not ids or any(not c for c in cont_ids):
            raise ValueError("empty context or continuation after tokenization")
        out.append((ids, cont_ids))
    return out


# --------------------------------------------------------------------------- planning


@dataclass
class _Row:
    """One forward row: ``ids`` after the cached prefix; each target ``(request, choice, cont)``
    is scored on the last ``len(cont)`` positions of the row. ``cluster``/``skip``: the row's first
    ``skip`` ids are the shared segment of cluster ``cluster`` (see :func:`_plan_clusters`), which
    the split path runs once for the whole cluster; the padded path runs ``ids`` whole."""

    ids: list[int]
    targets: list[tuple[int, int, list[int]]]
    cluster: int | None = None
    skip: int = 0

    @property
    def cap(self) -> int:
        """Most leading ids a cluster may take: the scored positions must stay in the row."""
        return len(self.ids) - max((len(c) for _, _, c in self.targets), default=1)


def _plan_rows(
    encoded: Sequence[tuple[list[int], list[list[int]]]],
) -> tuple[list[int], list[_Row], int]:
    """Pick the shared prefix (longest common token prefix) and build the suffix rows; also
    returns how many requests took the one-row-for-all-choices path."""
    ctxs = [ctx for ctx, _ in encoded]
    common = min(len(c) for c in ctxs) - 1  # keep >= 1 suffix token per row
    first = ctxs[0]
    for ctx in ctxs[1:]:
        n = 0
        limit = min(common, len(ctx))
        while n < limit and ctx[n] == first[n]:
            n += 1
        common = n
    prefix = first[:common]
    rows, n_fast = [], 0
    for qi, (ctx, conts) in enumerate(encoded):
        if all(len(c) == 1 for c in conts):
            rows.append(_Row(ctx[common:], [(qi, ci, c) for ci, c in enumerate(conts)]))
            n_fast += 1
        else:  # multi-token continuation: one row per choice, scored like lm-eval
            for ci, c in enumerate(conts):
                rows.append(_Row((ctx + c)[common:-1], [(qi, ci, c)]))
    return prefix, rows, n_fast


def _common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _plan_clusters(rows: Sequence[_Row], min_shared: int = 32) -> list[list[int]]:
    """Second cache level: rows whose suffixes (after the group's prefix) start with the same
    ``>= min_shared`` tokens (MMLU's history subjects put 2-5 questions on one reading passage;
    a cloze question's rows share the whole question) form a cluster whose shared segment is run
    once. Greedy over the rows sorted by ids: a run of neighbours is extended while the tokens it
    saves, (size - 1) x common length, do not drop. Sets ``cluster``/``skip`` on the rows; returns
    the clusters' shared segments (``rows[i].ids[:skip]``) by cluster index, as row indices."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].ids)
    clusters: list[list[int]] = []
    i = 0
    while i < len(order):
        run, shared = [order[i]], rows[order[i]].cap
        for j in order[i + 1 :]:
            common = min(shared, _common_len(rows[run[-1]].ids, rows[j].ids), rows[j].cap)
            if common < min_shared or len(run) * common < (len(run) - 1) * shared:
                break
            run.append(j)
            shared = common
        if len(run) > 1:
            for k in run:
                rows[k].cluster, rows[k].skip = len(clusters), shared
            clusters.append(run)
        i += len(run)
    return clusters


def _cluster_batches(rows: Sequence[_Row], batch_size: int) -> list[list[_Row]]:
    """Batches for the packed split path (no padding there): a cluster's rows stay next to each
    other (its shared segment is run once per batch that holds them, so a cluster rarely spans
    two), clusters and lone rows longest-first, at most ``batch_size`` rows per batch."""
    units: dict[object, list[_Row]] = {}
    for k, r in enumerate(rows):
        units.setdefault(("c", r.cluster) if r.cluster is not None else ("r", k), []).append(r)
    ordered = sorted(units.values(), key=lambda u: -max(len(r.ids) for r in u))
    flat = [r for u in ordered for r in u]
    return [flat[k : k + batch_size] for k in range(0, len(flat), batch_size)]


def _length_batches(rows: Sequence[_Row], batch_size: int, max_padding: float) -> list[list[_Row]]:
    """Longest-first batches of at most ``batch_size`` rows; a batch is also closed when adding
    the next row would make padding exceed ``max_padding`` of its real tokens (suffix lengths
    vary a lot within a group, and padded tokens cost as much as real ones)."""
    batches: list[list[_Row]] = []
    cur: list[_Row] = []
    real = 0
    for row in sorted(rows, key=lambda r: -len(r.ids)):
        n = len(row.ids)
        if cur and (len(cur) == batch_size or len(cur[0].ids) * (len(cur) + 1) > (real + n) * (1 + max_padding)):
            batches.append(cur)
            cur, real = [], 0
        cur.append(row)
        real += n
    return batches + ([cur] if cur else [])


# --------------------------------------------------------------------------- forward


@contextmanager
def _native_gqa_sdpa(device: torch.device) -> Iterator[None]:
    """On CPU, let transformers pass grouped KV heads straight to SDPA (``enable_gqa``) instead
    of materialising repeated K/V for the whole cached prefix (~15-20% faster here). transformers
    only does this without a mask by default because CUDA kernels fall back to the math path;
    on CPU the masked GQA path is fine. Scoped: the variable is restored afterwards."""
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or key in os.environ:
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        os.environ.pop(key, None)


_USE_SPLIT = True  # tests and benchmarks switch the packed split-attention path off here


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _SplitUnsupported(Exception):
    """The model's attention call has a feature the split path does not reproduce."""


_SPLIT_NAME = "align_prefix_split"
_SPLIT_STATE = threading.local()  # .current: the _SplitBatch of the forward running on this thread


@dataclass
class _SplitBatch:
    """What the split attention needs besides q/k/v: the prefix KV per layer ([1, Hkv, P, D],
    never copied) and the packed rows' boundaries; ``calls`` proves every layer came through.
    ``segments``: packed query ranges ``(a, b)`` whose rows also follow a cluster's shared
    segment, with that segment's KV per layer. ``capture``: when a list, each layer's packed
    key/value are appended to it (how a segment's KV is made)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    bounds: list[tuple[int, int]]
    total_len: int
    segments: list[tuple[int, int, list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=list)
    capture: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    calls: int = 0


def _split_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """softmax over [prefix; (cluster segment;) own suffix] = flash calls merged by log-sum-exp
    (exact up to rounding). ``query``/``key``/``value``: [1, H(kv), N, D] for the packed rows of
    one batch."""
    state: _SplitBatch | None = getattr(_SPLIT_STATE, "current", None)
    layer = getattr(module, "layer_idx", None)
    window = kwargs.get("sliding_window")
    if (
        state is None
        or layer is None
        or not 0 <= layer < len(state.kv)
        or attention_mask is not None
        or dropout
        or query.shape[0] != 1
        or not getattr(module, "is_causal", True)
        or kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None
        or kwargs.get("position_bias") is not None
        or (window is not None and window < state.total_len)
    ):
        raise _SplitUnsupported
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    pk, pv = state.kv[layer]
    # The CPU flash op returns out [1, H, n, D] / lse [1, H, n] laid out as [1, n, H, D] / [1, n, H]:
    # everything below works on .transpose(1, 2) views in that layout, so the per-row parts join by
    # plain memory copies and the result is already the [1, N, H, D] the caller wants (merging in
    # the [1, H, N, D] view cost a strided cat, mixed-layout elementwise ops and a final copy).
    # 1. every packed query against the shared prefix: one unmasked call, GQA handled natively
    out, lse = (t.transpose(1, 2) for t in flash(query, pk, pv, 0.0, False, scale=scaling))
    # 1b. rows after a cluster's shared segment: their queries against its KV, merged into part 1
    for a, b, seg in state.segments:
        sk, sv = seg[layer]
        s_out, s_lse = (t.transpose(1, 2) for t in flash(query[:, :, a:b], sk, sv, 0.0, False, scale=scaling))
        p_lse = lse[:, a:b]
        weight = torch.sigmoid(p_lse - s_lse).unsqueeze(-1).to(out.dtype)
        out[:, a:b] = torch.lerp(s_out, out[:, a:b], weight)
        lse[:, a:b] = torch.logaddexp(p_lse, s_lse)
    if state.capture is not None:
        state.capture.append((key, value))
    # 2. each row causally against its own suffix (q_len == kv_len: is_causal is exact)
    parts = [
        flash(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], 0.0, True, scale=scaling) for a, b in state.bounds
    ]
    own = torch.cat([o.transpose(1, 2) for o, _ in parts], dim=1)
    own_lse = torch.cat([lse_.transpose(1, 2) for _, lse_ in parts], dim=1)
    # softmax over both key sets = the two partial outputs weighted by exp(lse): the prefix part's
    # share is sigmoid(lse_prefix - lse_own); a few whole-batch ops, not per row
    share = torch.sigmoid(lse - own_lse).unsqueeze(-1).to(out.dtype)
    state.calls += 1
    return torch.lerp(own, out, share), None


def _split_available(model: Any, device: torch.device) -> bool:
    """CPU, a model on transformers' SDPA attention, and the CPU flash op that returns the LSE."""
    config = getattr(model, "config", None)
    return (
        device.type == "cpu"
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


@contextmanager
def _split_attention_on(model: Any, state: _SplitBatch) -> Iterator[None]:
    """Route this model's attention through :func:`_split_attention` for one forward (the
    config's implementation is restored afterwards, also on error)."""
    from transformers import AttentionInterface

    if _SPLIT_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_SPLIT_NAME, _split_attention)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = _SPLIT_NAME
    _SPLIT_STATE.current = state
    try:
        yield
    finally:
        _SPLIT_STATE.current = None
        config._attn_implementation = before


class _PrefixScorer:
    """Runs suffix rows against a prefix KV cache computed once; the cache tensors are never
    mutated. Packed split attention where available (see the module docstring), else each batch
    gets a fresh ``DynamicCache`` built from expanded views and left-padded rows."""

    def __init__(self, model: Any, prefix: list[int], device: torch.device, pad_id: int) -> None:
        from transformers import DynamicCache

        self.model, self.device, self.pad_id = model, device, pad_id
        self._cache_cls = DynamicCache
        self.prefix_len = len(prefix)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.use_logits_to_keep = True
        if prefix:
            ids = torch.tensor([prefix], device=device)
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": True}
            try:  # logits of the prefix are not needed: skip the LM head where supported
                out = model(**kwargs, logits_to_keep=1)
            except TypeError:
                out = model(**kwargs)
            self.kv = [(k, v) for k, v, *_ in out.past_key_values]
        self.use_split = _USE_SPLIT and bool(self.kv) and _split_available(model, device)
        self.segments: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # cluster -> KV per layer

    def release(self, clusters: Sequence[int]) -> None:
        """Drop the KV of clusters no later batch needs."""
        for c in clusters:
            self.segments.pop(c, None)

    def _forward_split(self, runs: Sequence[tuple[list[int], int]], keep_idx: list[int], state: _SplitBatch) -> Any:
        """One packed forward of ``runs`` (ids, first position) with split attention."""
        ids = torch.tensor([[t for r, _ in runs for t in r]], device=self.device)
        pos = torch.cat([torch.arange(at, at + len(r)) for r, at in runs]).unsqueeze(0).to(self.device)
        with _split_attention_on(self.model, state):
            logits = self.model(
                input_ids=ids,
                position_ids=pos,
                use_cache=False,
                logits_to_keep=torch.tensor(keep_idx, device=self.device),
            ).logits
        if state.calls != len(self.kv):  # some layer did not come through the split attention
            raise _SplitUnsupported
        return logits

    def _ensure_segments(self, rows: Sequence[_Row]) -> None:
        """Run the shared segments of the batch's clusters not yet cached (one forward each, after
        the prefix: a segment's KV then depends on nothing else, so every rank and batch split
        gets the same bits) and keep each one's KV per layer."""
        p = self.prefix_len
        for r in rows:
            if r.cluster is None or r.cluster in self.segments:
                continue
            seg = r.ids[: r.skip]
            state = _SplitBatch(self.kv, [(0, len(seg))], p + len(seg), capture=[])
            self._forward_split([(seg, p)], [len(seg) - 1], state)
            self.segments[r.cluster] = state.capture

    def _cache(self, batch: int) -> Any:
        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.kv]
        return self._cache_cls(ddp_cache_data=data, config=self.model.config)

    def logprobs(self, rows: Sequence[_Row]) -> torch.Tensor:
        """Log-softmax (float32) over the last ``keep`` positions of every row: [B, keep, V]."""
        if self.use_split:
            try:
                return self._logprobs_split(rows)
            except (_SplitUnsupported, TypeError):  # e.g. no tensor `logits_to_keep`: plain path
                self.use_split = False
        return self._logprobs_padded(rows)

    def _logprobs_split(self, rows: Sequence[_Row]) -> torch.Tensor:
        """Rows packed into one unpadded sequence (each without its cluster's shared segment,
        which is attended to from its cached KV); logits only at each row's last ``keep`` positions."""
        self._ensure_segments(rows)
        keep = max(len(c) for r in rows for _, _, c in r.targets)
        p = self.prefix_len
        bounds, keep_idx, segments, start = [], [], [], 0
        for r in rows:
            n = len(r.ids) - r.skip
            bounds.append((start, start + n))
            if r.cluster is not None:
                if segments and segments[-1][2] is self.segments[r.cluster] and segments[-1][1] == start:
                    segments[-1] = (segments[-1][0], start + n, segments[-1][2])
                else:
                    segments.append((start, start + n, self.segments[r.cluster]))
            # a row shorter than `keep` repeats its first position; those slots are never gathered
            keep_idx.extend(start + max(n - keep + j, 0) for j in range(keep))
            start += n
        state = _SplitBatch(self.kv, bounds, p + max(len(r.ids) for r in rows), segments=segments)
        logits = self._forward_split([(r.ids[r.skip :], p + r.skip) for r in rows], keep_idx, state)
        return torch.log_softmax(logits[0].float(), dim=-1).view(len(rows), keep, -1)

    def _logprobs_padded(self, rows: Sequence[_Row]) -> torch.Tensor:
        """Rows left-padded in a batch against an expanded ``DynamicCache`` of the prefix."""
        width = max(len(r.ids) for r in rows)
        keep = max(len(c) for r in rows for _, _, c in r.targets)
        b, p = len(rows), self.prefix_len
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, p + width), dtype=torch.long)
        mask[:, :p] = 1
        pos = torch.full((b, width), p, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.ids)
            ids[i, width - n :] = torch.tensor(r.ids)
            mask[i, p + width - n :] = 1
            pos[i, width - n :] = torch.arange(p, p + n)
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": pos.to(self.device),
            "use_cache": True,
        }
        if self.kv:
            kwargs["past_key_values"] = self._cache(b)
        if self.use_logits_to_keep:
            try:
                logits = self.model(**kwargs, logits_to_keep=keep).logits
            except TypeError:  # model without `logits_to_keep`: compute all, slice below
                self.use_logits_to_keep = False
                if self.kv:
                    kwargs["past_key_values"] = self._cache(b)
                logits = self.model(**kwargs).logits
        else:
            logits = self.model(**kwargs).logits
        return torch.log_softmax(logits[:, -keep:].float(), dim=-1)

    def score(self, batch: Sequence[_Row]) -> dict[tuple[int, int], float]:
        """``{(request, choice): summed log-likelihood}`` for every target of the batch."""
        logp = self.logprobs(batch)
        keep = logp.shape[1]
        # one gather (and one device->host copy) for every target token of the batch
        idx = [
            (b, keep - len(cont) + j, tok)
            for b, row in enumerate(batch)
            for _, _, cont in row.targets
            for j, tok in enumerate(cont)
        ]
        rows_i, pos_i, tok_i = torch.tensor(idx, device=logp.device).unbind(1)
        values = logp[rows_i, pos_i, tok_i].tolist()
        out, k = {}, 0
        for row in batch:
            for qi, ci, cont in row.targets:
                out[(qi, ci)] = sum(values[k : k + len(cont)])
                k += len(cont)
        return out


# --------------------------------------------------------------------------- entry point


def score_choices(
    model: Any,
    tokenizer: Any,
    requests: Sequence[ChoiceRequest],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    add_special_tokens: bool | None = None,
    max_padding: float = 0.15,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[ChoiceScores]:
    """Log-likelihood of every continuation of every request, in request order.

    Works with any HF causal LM whose forward accepts ``past_key_values``/``position_ids``
    (plain or peft-wrapped). ``add_special_tokens`` mirrors lm-eval's ``add_bos_token`` model
    arg (``None``: the tokenizer's default). ``max_padding`` bounds padded/real tokens per batch.
    Contexts are not left-truncated: context + continuation must fit the model's window.
    Under N processes every rank must pass the same requests; all ranks return all scores.
    """
    if not requests:
        return []
    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    split = _USE_SPLIT and _split_available(model, device)

    members: dict[Hashable, list[int]] = {}
    for i, r in enumerate(requests):
        members.setdefault(r.group, []).append(i)
    plans = []  # (global request indices, prefix ids, batches), groups in first-appearance order
    token_counts: list[tuple[int, ...]] = [()] * len(requests)
    for idx in members.values():
        encoded = encode_pairs(
            tokenizer,
            [requests[i].context for i in idx],
            [requests[i].continuations for i in idx],
            add_special_tokens,
        )
        for i, (_, conts) in zip(idx, encoded, strict=True):
            token_counts[i] = tuple(len(c) for c in conts)
        prefix, rows, _ = _plan_rows(encoded)
        if split and prefix:  # packed rows: no padding to bound; shared segments run once
            _plan_clusters(rows)
            batches = _cluster_batches(rows, batch_size)
        else:
            batches = _length_batches(rows, batch_size, max_padding)
        plans.append((idx, prefix, batches))

    was_training = getattr(model, "training", False)
    model.eval()
    mine: dict[tuple[int, int], float] = {}
    bar = tqdm(total=sum(len(b) for _, _, batches in plans for b in batches), desc=desc, disable=not progress)
    batch_no = 0  # counts batches over all groups: batch b goes to rank b mod world
    try:
        with torch.inference_mode(), _native_gqa_sdpa(device):
            for idx, prefix, batches in plans:
                owned = [b for bi, b in enumerate(batches, start=batch_no) if distributed.mine(bi)]
                batch_no += len(batches)
                bar.update(sum(len(b) for b in batches) - sum(len(b) for b in owned))
                if not owned:
                    continue  # other ranks score this group: skip its prefix forward too
                scorer = _PrefixScorer(model, prefix, device, pad_id)
                last = {r.cluster: k for k, b in enumerate(owned) for r in b if r.cluster is not None}
                for k, batch in enumerate(owned):
                    for (qi, ci), v in scorer.score(batch).items():
                        mine[(idx[qi], ci)] = v
                    scorer.release([c for c, at in last.items() if at == k])
                    bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)

    ll = distributed.merge_gathered(mine)
    return [
        ChoiceScores(
            tuple(ll[(i, c)] for c in range(len(r.continuations))),
            token_counts[i],
            tuple(len(c.encode("utf-8")) for c in r.continuations),
        )
        for i, r in enumerate(requests)
    ]


__all__ = [
    "ChoiceRequest",
    "ChoiceScores",
    "argmax",
    "encode_pairs",
    "length_normalized",
    "score_choices",
]
