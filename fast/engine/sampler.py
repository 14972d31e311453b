"""Batched token sampling with per-row parameters: greedy, temperature, top-k, top-p, seeds.

Order of operations for each row (vLLM's): divide the logits by the temperature, keep the
``top_k`` largest, keep the smallest prefix of the sorted distribution whose mass reaches
``top_p``, then draw from the renormalized distribution. A greedy row (temperature 0) takes the
argmax of the raw logits.

The draw uses the exponential race: with ``E_i ~ Exp(1)`` independent, ``argmax_i p_i / E_i``
is distributed as ``p``. A seeded row draws its ``V`` exponentials from its own
``torch.Generator``, so its tokens depend only on its seed and its logits, never on which other
requests share the batch. Unseeded rows share the global generator.

Log-probabilities are those of the raw model distribution, ``log_softmax(logits)`` before
temperature, top-k and top-p (what vLLM returns by default), so they measure the model, not the
sampling settings.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from fast.engine.sampling_params import SamplingParams


class SamplerInputError(ValueError):
    """``sample`` got mismatched row counts."""


class Sampler:
    """Stateless: ``sample`` turns a batch of logits into one token per row."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        banned: Sequence[Collection[int]] | None = None,
    ) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [N, V] float32 -> (N token ids, N logprob dicts or None).

        ``generators[i]`` (optional) is row ``i``'s own generator, created from its seed by the
        caller and kept across steps. ``banned[i]`` (optional) lists token ids row ``i`` must
        not produce this step -- EOS and ``stop_token_ids`` while fewer than ``min_tokens``
        tokens exist, as vLLM does; they are removed before greedy or random choice (the
        reported logprobs stay those of the raw distribution). The logprob dict of a row with
        ``logprobs=k`` maps the ``k`` most likely token ids and the sampled id to their
        log-probabilities; rows with ``logprobs=None`` get None.
        """
        n = logits.shape[0]
        gens: Sequence[torch.Generator | None] = (
            generators if generators is not None else [None] * n
        )
        if len(params) != n or len(gens) != n or (banned is not None and len(banned) != n):
            raise SamplerInputError(
                f"{n} logit rows, {len(params)} params, {len(gens)} "
                f"generators, {n if banned is None else len(banned)} bans"
            )
        if n == 0:
            return [], []
        logits = logits.float()
        choice = logits
        if banned is not None and any(banned):
            choice = logits.clone()
            for row, ids in enumerate(banned):
                if ids:
                    choice[row, list(ids)] = float("-inf")
        tokens = self._choose(choice, params, gens)  # [N]
        token_list: list[int] = tokens.tolist()
        return token_list, self._logprobs(logits, tokens, params)

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
        sub = logits[rows]  # [M, V]
        temps = torch.tensor(
            [params[r].temperature for r in rows], dtype=sub.dtype, device=sub.device
        )
        probs = torch.softmax(
            apply_top_k_top_p(
                sub / temps[:, None],
                [params[r].top_k_or_none for r in rows],
                [params[r].top_p for r in rows],
            ),
            dim=-1,
        )  # [M, V]
        race = torch.empty_like(probs)  # [M, V]
        unseeded = [i for i, r in enumerate(rows) if gens[r] is None]
        if unseeded:
            race[unseeded] = torch.empty_like(probs[unseeded]).exponential_()
        for i, r in enumerate(rows):
            gen = gens[r]
            if gen is not None:
                race[i].exponential_(generator=gen)
        race.clamp_(min=torch.finfo(race.dtype).tiny)  # an Exp(1) draw of exactly 0
        tokens[rows] = (probs / race).argmax(dim=-1)
        return tokens

    # -- log-probabilities of the raw distribution
    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[dict[int, float] | None]:
        # logits [N, V], tokens [N] -> per-row dicts
        wanted = [p.logprobs for p in params]
        if all(k is None for k in wanted):
            return [None] * len(params)
        logp = torch.log_softmax(logits, dim=-1)  # [N, V]
        k_max = max(k for k in wanted if k is not None)
        top_vals, top_ids = (
            logp.topk(k_max, dim=-1) if k_max > 0 else (logp[:, :0], tokens[:, None][:, :0])
        )  # [N, K]
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)  # [N]
        out: list[dict[int, float] | None] = []
        for i, k in enumerate(wanted):
            if k is None:
                out.append(None)
                continue
            row = dict(zip(top_ids[i, :k].tolist(), top_vals[i, :k].tolist()))
            row[int(tokens[i])] = float(chosen[i])
            out.append(row)
        return out


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
        ks = torch.tensor([k if k is not None else v for k in top_k], device=logits.device)
        remove |= rank >= ks[:, None]
    if use_p:
        masked = sorted_logits.masked_fill(remove, float("-inf"))
        probs = torch.softmax(masked, dim=-1)  # [M, V]
        before = probs.cumsum(dim=-1) - probs  # mass before i
        ps = torch.tensor(list(top_p), dtype=probs.dtype, device=logits.device)
        remove |= (before >= ps[:, None]) & (rank > 0)
    mask = torch.empty_like(remove).scatter_(1, order, remove)  # back to [M, V]
    return logits.masked_fill(mask, float("-inf"))
