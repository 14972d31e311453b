"""Batched token sampling with per-row parameters, in vLLM's order of operations.

For each row:

1. the ``logits_processors`` of its request, in order (``f(output_ids, logits)``);
2. the penalties: ``repetition_penalty`` over the tokens of the prompt and the output (a
   positive logit is divided by it, a negative one multiplied), then ``frequency_penalty``
   times each token's count in the output and ``presence_penalty`` once for each token present
   in the output, both subtracted;
3. banned tokens (``min_tokens``) are set to ``-inf``;
4. a greedy row (temperature 0) takes the argmax here; the others divide by the temperature,
   keep the ``top_k`` largest, keep the smallest prefix of the sorted distribution whose mass
   reaches ``top_p``, drop the tokens whose probability is below ``min_p`` times the largest,
   and draw from what is left, renormalized.

The draw uses the exponential race: with ``E_i ~ Exp(1)`` independent, ``argmax_i p_i / E_i``
is distributed as ``p``. A seeded row draws its ``V`` exponentials from its own
``torch.Generator``, so its tokens depend only on its seed and its logits, never on which other
requests share the batch. Unseeded rows share the global generator.

Log-probabilities are those of the raw model distribution, ``log_softmax(logits)`` before
processors, penalties, temperature, top-k, top-p and min-p (what vLLM returns by default), so
they measure the model, not the sampling settings. The sampled token's log-probability is
computed for every row (the engine sums it into ``cumulative_logprob``); the top-``k``
alternatives and ranks only for rows that ask for ``logprobs``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import torch

from fast.engine.batch import to_device
from fast.engine.outputs import Logprob
from fast.engine.sampling_params import LogitsProcessor, SamplingParams


class SamplerInputError(ValueError):
    """``sample`` got mismatched row counts, or penalties without the token histories."""


class SamplerOutput(NamedTuple):
    """What :meth:`Sampler.sample` returns for ``N`` rows."""

    tokens: list[int]  # [N] the sampled token ids
    logprobs: list[dict[int, Logprob] | None]  # [N] top-k + sampled; None: not asked for
    sampled_logprobs: list[float]  # [N] raw log-probability of each sampled token


class Sampler:
    """Stateless: ``sample`` turns a batch of logits into one token per row."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        banned: Sequence[Collection[int]] | None = None,
        histories: Sequence[tuple[Sequence[int], Sequence[int]] | None] | None = None,
    ) -> SamplerOutput:
        """logits [N, V] float32 -> :class:`SamplerOutput` (N tokens, logprobs).

        ``generators[i]`` (optional) is row ``i``'s own generator, created from its seed by the
        caller and kept across steps. ``banned[i]`` (optional) lists token ids row ``i`` must
        not produce this step -- EOS and ``stop_token_ids`` while fewer than ``min_tokens``
        tokens exist, as vLLM does; they are removed before greedy or random choice (the
        reported logprobs stay those of the raw distribution). ``histories[i]`` is row ``i``'s
        ``(prompt_token_ids, output_token_ids)``, needed by the rows whose parameters have
        penalties or logits processors (``SamplingParams.needs_history``). The logprob dict of
        a row with ``logprobs=k`` maps the ``k`` most likely token ids and the sampled id to
        their :class:`~fast.engine.outputs.Logprob` (ranks from 1); rows with
        ``logprobs=None`` get None.
        """
        n = logits.shape[0]
        gens: Sequence[torch.Generator | None] = (
            generators if generators is not None else [None] * n
        )
        if (
            len(params) != n
            or len(gens) != n
            or (banned is not None and len(banned) != n)
            or (histories is not None and len(histories) != n)
        ):
            raise SamplerInputError(
                f"{n} logit rows, {len(params)} params, {len(gens)} "
                f"generators, {n if banned is None else len(banned)} bans, "
                f"{n if histories is None else len(histories)} histories"
            )
        if n == 0:
            return SamplerOutput([], [], [])
        logits = logits.float()
        choice = logits
        if any(p.needs_history for p in params):
            choice = process_logits(logits, params, histories)
        if banned is not None and any(banned):
            choice = choice.clone() if choice is logits else choice
            for row, ids in enumerate(banned):
                if ids:
                    choice[row, list(ids)] = float("-inf")
        tokens = self._choose(choice, params, gens)  # [N]
        token_list, sampled, lps = _logprobs(logits, tokens, [p.logprobs for p in params])
        return SamplerOutput(token_list, lps, sampled)

    def sample_device(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` without the host: logits [N, V] -> (tokens [N] int64, packed [2, N]
        float64 of the token ids and their raw log-probabilities), both on the logits' device,
        with no synchronization (the engine's overlapped scheduling feeds ``tokens`` to the
        next step's forward and copies ``packed`` to the host while it runs). The same tokens
        and log-probabilities as :meth:`sample` for rows without logits processors,
        penalties, bans or ``logprobs`` (the engine runs those rows synchronously)."""
        n = logits.shape[0]
        gens: Sequence[torch.Generator | None] = (
            generators if generators is not None else [None] * n
        )
        if len(params) != n or len(gens) != n:
            raise SamplerInputError(f"{n} logit rows, {len(params)} params, {len(gens)} generators")
        if any(p.needs_history or p.logprobs is not None for p in params):
            raise SamplerInputError("sample_device takes no history or logprobs rows")
        logits = logits.float()
        tokens = self._choose(logits, params, gens)  # [N]
        norm = torch.logsumexp(logits, dim=-1)  # [N]
        chosen = logits.gather(1, tokens[:, None]).squeeze(1) - norm  # [N]
        return tokens, torch.stack((tokens.to(torch.float64), chosen.to(torch.float64)))

    # -- token choice
    def _choose(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        gens: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        # logits [N, V] -> tokens [N] int64
        tokens = logits.argmax(dim=-1)  # [N]
        rows = [i for i, p in enumerate(params) if not p.is_greedy]  # decided on the host
        if not rows:
            return tokens
        # (index tensors through to_device: a Python list as an index copies synchronously)
        index = to_device(rows, torch.int64, logits.device)  # [M]
        sub = logits.index_select(0, index)  # [M, V]
        probs = torch.softmax(warp_logits(sub, [params[r] for r in rows]), dim=-1)  # [M, V]
        race = torch.empty_like(probs)  # [M, V]
        unseeded = [i for i, r in enumerate(rows) if gens[r] is None]
        if unseeded:
            draws = torch.empty(
                (len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device
            ).exponential_()  # [U, V]
            race.index_copy_(0, to_device(unseeded, torch.int64, probs.device), draws)
        for i, r in enumerate(rows):
            gen = gens[r]
            if gen is not None:
                race[i].exponential_(generator=gen)
        race.clamp_(min=torch.finfo(race.dtype).tiny)  # an Exp(1) draw of exactly 0
        tokens.index_copy_(0, index, (probs / race).argmax(dim=-1))
        return tokens


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, wanted: Sequence[int | None]
) -> tuple[list[float], list[dict[int, Logprob] | None]]:
    """Raw log-probabilities of ``tokens`` under ``logits``, and vLLM's logprob dicts.

    logits [N, V], tokens [N] -> (N floats, N dicts or None). Row ``i`` with ``wanted[i] = k``
    gets ``{id: Logprob(logprob, rank)}`` for its ``k`` most likely ids (ranks 1..k) and for
    ``tokens[i]``, whose rank is the number of ids at least as likely as it (vLLM's). The
    engine uses it for sampled tokens and for ``prompt_logprobs`` (tokens = the next prompt
    token of every position).
    """
    _, sampled, dicts = _logprobs(logits, tokens, wanted)
    return sampled, dicts


def _logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, wanted: Sequence[int | None]
) -> tuple[list[int], list[float], list[dict[int, Logprob] | None]]:
    """:func:`token_logprobs` plus the tokens as ints, with one device-to-host copy for the
    tokens and their log-probabilities together (a step's only synchronization when no row
    asks for logprobs)."""
    logits = logits.float()
    norm = torch.logsumexp(logits, dim=-1)  # [N]
    chosen = logits.gather(1, tokens[:, None]).squeeze(1) - norm  # [N]
    # [2, N] float64: token ids (exact below 2^53) and float32 log-probs (exact in float64)
    packed = torch.stack((tokens.to(torch.float64), chosen.to(torch.float64))).tolist()
    token_list = list(map(int, packed[0]))
    sampled: list[float] = packed[1]
    rows = [i for i, k in enumerate(wanted) if k is not None]
    if not rows:
        return token_list, sampled, [None] * len(wanted)
    logp = logits[rows] - norm[rows, None]  # [M, V]
    ranks = (logp >= chosen[rows, None]).sum(dim=-1).tolist()  # [M]
    k_max = max(wanted[i] or 0 for i in rows)
    top_vals, top_ids = logp.topk(k_max, dim=-1) if k_max > 0 else (logp[:, :0], logp[:, :0])
    top_v, top_i = top_vals.tolist(), top_ids.tolist()
    out: list[dict[int, Logprob] | None] = [None] * len(wanted)
    for j, i in enumerate(rows):
        k = wanted[i] or 0
        row = {
            int(t): Logprob(v, r + 1) for r, (t, v) in enumerate(zip(top_i[j][:k], top_v[j][:k]))
        }
        token = token_list[i]
        if token not in row:
            row[token] = Logprob(sampled[i], int(ranks[j]))
        out[i] = row
    return token_list, sampled, out


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    presence: Sequence[float],
    frequency: Sequence[float],
    repetition: Sequence[float],
) -> torch.Tensor:
    """vLLM's penalties; logits [M, V], prompt_mask [M, V] bool, output_counts [M, V] -> [M, V].

    Repetition first (over prompt and output tokens: positive logits divided by the penalty,
    negative ones multiplied), then ``frequency * count`` and ``presence * (count > 0)``
    subtracted (over output tokens only).
    """
    dev, dt = logits.device, logits.dtype
    rep = torch.tensor(list(repetition), dtype=dt, device=dev)[:, None]  # [M, 1]
    freq = torch.tensor(list(frequency), dtype=dt, device=dev)[:, None]
    pres = torch.tensor(list(presence), dtype=dt, device=dev)[:, None]
    seen = prompt_mask | (output_counts > 0)  # [M, V]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where(seen, penalized, logits)
    counts = output_counts.to(dt)
    return out - freq * counts - pres * (counts > 0).to(dt)


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[tuple[Sequence[int], Sequence[int]] | None] | None,
) -> torch.Tensor:
    """Steps 1 and 2: each row's logits processors, then its penalties; logits [N, V] -> a new
    [N, V] tensor. ``histories[i]`` is row ``i``'s ``(prompt ids, output ids)``; rows whose
    parameters need no history may have None."""
    rows = [i for i, p in enumerate(params) if p.needs_history]
    hist: list[tuple[Sequence[int], Sequence[int]]] = []
    for i in rows:
        h = histories[i] if histories is not None else None
        if h is None:
            raise SamplerInputError(
                f"row {i} has penalties or logits processors but no (prompt, output) history"
            )
        hist.append(h)
    out = logits.clone()
    for row, (prompt, output) in zip(rows, hist):
        for proc in params[row].logits_processors or ():
            out[row] = _call_processor(proc, prompt, output, out[row])
    pen = [j for j, i in enumerate(rows) if params[i].has_penalties]
    if not pen:
        return out
    v, dev = logits.shape[1], logits.device
    prompt_mask = torch.zeros(len(pen), v, dtype=torch.bool, device=dev)  # [P, V]
    counts = torch.zeros(len(pen), v, dtype=torch.int64, device=dev)  # [P, V]
    for j, i in enumerate(pen):
        prompt, output = hist[i]
        if len(prompt):
            prompt_mask[j, torch.as_tensor(list(prompt), device=dev)] = True
        if len(output):
            ids = torch.as_tensor(list(output), device=dev)
            counts[j].index_add_(0, ids, torch.ones_like(ids))
    index = torch.tensor([rows[i] for i in pen], device=dev)
    chosen = [params[rows[i]] for i in pen]
    out[index] = apply_penalties(
        out[index],
        prompt_mask,
        counts,
        [p.presence_penalty for p in chosen],
        [p.frequency_penalty for p in chosen],
        [p.repetition_penalty for p in chosen],
    )
    return out


def warp_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Step 4 for sampled rows: divide by the temperature, then the top-k, top-p and min-p
    masks (to -inf); logits [M, V] -> [M, V]. The rows must not be greedy."""
    temps = to_device([p.temperature for p in params], logits.dtype, logits.device)  # [M]
    out = apply_top_k_top_p(
        logits / temps[:, None], [p.top_k_or_none for p in params], [p.top_p for p in params]
    )
    min_p = [p.min_p for p in params]
    return apply_min_p(out, min_p) if any(m > 0 for m in min_p) else out


_ARITY: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _arity(proc: LogitsProcessor) -> int:
    """3 for ``f(prompt_ids, output_ids, logits)``, else 2 (vLLM's rule: count parameters)."""
    try:
        return _ARITY[proc]
    except (KeyError, TypeError):  # not seen yet, or not weakly referenceable
        pass
    try:
        arity = 3 if len(inspect.signature(proc).parameters) == 3 else 2
    except (TypeError, ValueError):
        arity = 2
    try:
        _ARITY[proc] = arity
    except TypeError:
        pass
    return arity


def _call_processor(
    proc: LogitsProcessor, prompt: Sequence[int], output: Sequence[int], row: torch.Tensor
) -> torch.Tensor:
    arity = _arity(proc)
    result = proc(list(prompt), list(output), row) if arity == 3 else proc(list(output), row)
    if not isinstance(result, torch.Tensor) or result.shape != row.shape:
        raise SamplerInputError(
            f"logits processor {proc!r} returned {type(result).__name__} "
            f"{getattr(result, 'shape', '')}, not a tensor of shape {tuple(row.shape)}"
        )
    return result.to(row.dtype)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int | None], top_p: Sequence[float]
) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p remove; logits [M, V] -> [M, V].

    Top-k keeps the ``k`` largest logits of a row (ties at the k-th value broken by sort order).
    Top-p then keeps, in descending order, every token whose preceding cumulative probability
    is below ``p`` -- the smallest prefix reaching ``p``; the most likely token always stays.
    """
    m, v = logits.shape
    use_k = any(k is not None and k < v for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [M, V]
    rank = torch.arange(v, device=logits.device)[None, :]  # [1, V]
    remove = torch.zeros(m, v, dtype=torch.bool, device=logits.device)  # [M, V]
    if use_k:
        ks = to_device([k if k is not None else v for k in top_k], torch.int64, logits.device)
        remove |= rank >= ks[:, None]
    if use_p:
        masked = sorted_logits.masked_fill(remove, float("-inf"))
        probs = torch.softmax(masked, dim=-1)  # [M, V]
        before = probs.cumsum(dim=-1) - probs  # mass before i
        ps = to_device(list(top_p), probs.dtype, logits.device)  # [M]
        remove |= (before >= ps[:, None]) & (rank > 0)
    mask = torch.empty_like(remove).scatter_(1, order, remove)  # back to [M, V]
    return logits.masked_fill(mask, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Mask (to -inf) the tokens whose probability is below ``min_p`` times the row's largest;
    logits [M, V] -> [M, V]. The most likely token always stays; 0 keeps everything."""
    probs = torch.softmax(logits, dim=-1)  # [M, V]
    ps = to_device(list(min_p), probs.dtype, logits.device)[:, None]  # [M, 1]
    remove = probs < ps * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(remove, float("-inf"))
