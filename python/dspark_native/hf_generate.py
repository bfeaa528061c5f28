"""DSpark inside transformers' ``generate``: a ``custom_generate`` decoding method.

transformers lets ``model.generate(..., custom_generate=fn)`` run its usual preparation (generation
config, special tokens, ``max_length``, logits processors, stopping criteria) and then hand the
decoding loop to ``fn``, with the signature of its own ``_sample`` plus any extra keyword
arguments ``fn`` declares (they are taken out of ``generate``'s kwargs). :func:`dspark_generate`
is such a method: the loop is our engine (DSpark / DFlash / EAGLE-3 drafting, the fused lossless
``verify_chain`` verification, rollback) over a :class:`~dspark_native.models.hf_target.TransformersTarget`
wrapping the model::

    from dspark_native.hf_generate import dspark_generate
    out = model.generate(input_ids, custom_generate=dspark_generate, drafter=drafter, max_new_tokens=64)

Greedy outputs equal ``model.generate`` without it (the same modules compute the logits); sampled
ones follow the same distribution (temperature, top-k, top-p are applied by ``verify_chain`` with
transformers' order: temperature, then top-k, then top-p). Other logits processors (repetition
penalty, min-p, bad words, ...), beam search and score outputs are refused by name, since our
verification cannot apply them; stopping criteria are honoured token by token.
"""

from __future__ import annotations

import torch

__all__ = ["dspark_generate"]

_SUPPORTED_PROCESSORS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")


def _sampling_settings(generation_config, logits_processor):
    """(temperature, top_k, top_p) from the processors transformers prepared; 0 = greedy."""
    temperature, top_k, top_p = 1.0, 0, 1.0
    for p in logits_processor or []:
        name = type(p).__name__
        if name == "TemperatureLogitsWarper":
            temperature = float(p.temperature)
        elif name == "TopKLogitsWarper":
            top_k = int(p.top_k)
        elif name == "TopPLogitsWarper":
            top_p = float(p.top_p)
        else:
            raise NotImplementedError(
                f"dspark_generate: logits processor {name} is not supported (DSpark verification "
                f"applies only {', '.join(_SUPPORTED_PROCESSORS)}); drop the setting that adds it"
            )
    if not generation_config.do_sample:
        return 0.0, 0, 1.0
    return temperature, top_k, top_p


def _check_config(generation_config) -> None:
    if (generation_config.num_beams or 1) > 1:
        raise NotImplementedError("dspark_generate: beam search (num_beams > 1) is not supported")
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise NotImplementedError(f"dspark_generate: {flag}=True is not supported (no per-step scores)")


def dspark_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    drafter=None,
    dspark_policy: str = "static",
    dspark_num_drafts: int | None = None,
    dspark_seed: int | None = None,
    **model_kwargs,
):
    """Decoding method for ``model.generate(..., custom_generate=dspark_generate, drafter=d)``.

    Args (the first six as transformers passes them to its own ``_sample``):
        model: the transformers causal LM (``generate``'s ``self``).
        input_ids: int64 [B, L], left-padded when ``attention_mask`` has zeros.
        drafter: a DSpark / DFlash / EAGLE-3 drafter for this model (vocabulary and hidden size
            of the model; e.g. :func:`dspark_native.models.load_drafter` with
            ``target=TransformersTarget(model)``, or one trained with ``dspark-native train``).
        dspark_policy: verification-length policy name or object (``Engine``'s ``policy``).
        dspark_num_drafts: drafts per round (default: the drafter's block).
        dspark_seed: base seed of the per-request Philox streams (row b uses seed + b); default
            drawn from torch's global generator, so ``torch.manual_seed`` makes runs repeatable.
    Returns:
        int64 [B, L + n] like ``generate``: the inputs followed by the new tokens, rows that
        stopped early padded with ``pad_token_id``; a ``GenerateDecoderOnlyOutput`` when
        ``return_dict_in_generate``. ``model.dspark_last_outputs`` keeps the engine's per-row
        :class:`~dspark_native.engine.RequestOutput` (tau, acceptance, timings).
    """
    from .engine import Engine, SamplingParams
    from .models.hf_target import TransformersTarget

    if drafter is None:
        raise TypeError("dspark_generate needs drafter=... (a DSpark, DFlash or EAGLE-3 drafter for this model)")
    if synced_gpus:
        raise NotImplementedError("dspark_generate: synced_gpus is not supported")
    if streamer is not None:  # pragma: no cover - transformers does not pass it to custom methods
        raise NotImplementedError("dspark_generate: streamer is not supported")
    _check_config(generation_config)
    temperature, top_k, top_p = _sampling_settings(generation_config, logits_processor)

    B, L = input_ids.shape
    max_new = int(generation_config.max_length) - L
    if max_new <= 0:
        return input_ids
    mask = model_kwargs.get("attention_mask")
    rows = input_ids.cpu()
    prompts: list[list[int]] = []
    for b in range(B):
        keep = rows[b] if mask is None else rows[b][mask[b].cpu().bool()]
        if keep.numel() == 0:
            raise ValueError(f"dspark_generate: row {b} of input_ids has no unmasked token")
        prompts.append(keep.tolist())
    eos = generation_config._eos_token_tensor
    eos_ids = [] if eos is None else [int(e) for e in eos.reshape(-1).tolist()]
    pad = generation_config._pad_token_tensor
    pad_id = int(pad.reshape(-1)[0]) if pad is not None else (eos_ids[0] if eos_ids else 0)
    if dspark_seed is None:
        dspark_seed = int(torch.randint(0, 2**62, (1,)).item())

    target = TransformersTarget(model)
    engine = Engine(
        target,
        drafter,
        policy=dspark_policy,
        num_drafts=dspark_num_drafts,
        max_batch=B,
        max_seq=max(len(p) for p in prompts) + max_new + 1,
    )
    generated = {}  # engine request id -> new tokens
    rid_of = {}  # engine request id -> row
    stopped_at = {}

    def on_tokens(rid, toks):
        # transformers' criteria look at the whole row after each token (the token that trips
        # one is kept, as in _sample); tokens after it are dropped below.
        out = generated[rid]
        for t in toks:
            if rid in stopped_at:
                return
            out.append(int(t))
            if stopping_criteria:
                seq = torch.cat([rows[rid_of[rid]], torch.tensor(out, dtype=rows.dtype)])[None]
                if bool(torch.as_tensor(stopping_criteria(seq.to(input_ids.device), None)).reshape(-1)[0]):
                    stopped_at[rid] = len(out)

    params = [
        SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=dspark_seed + b,
            stop_token_ids=eos_ids,
        )
        for b in range(B)
    ]
    ids = []
    for b, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        rid = engine.add(p, sp, on_tokens=on_tokens)
        ids.append(rid)
        rid_of[rid] = b
        generated[rid] = []
    while engine.has_unfinished():
        engine.step()
        for rid in list(stopped_at):
            if not engine.output(rid).finished:
                engine.finish(rid)
    results = [engine.output(rid) for rid in ids]
    for r in results:
        if r.finish_reason == "error":
            raise RuntimeError(f"dspark_generate: row {rid_of[r.request_id]}: {r.error}")
    model.dspark_last_outputs = results
    new = [generated[rid][: stopped_at.get(rid, len(generated[rid]))] for rid in ids]
    width = max(len(t) for t in new)
    out = torch.full((B, L + width), pad_id, dtype=input_ids.dtype)
    out[:, :L] = rows
    for b, toks in enumerate(new):
        out[b, L : L + len(toks)] = torch.tensor(toks, dtype=input_ids.dtype)
    out = out.to(input_ids.device)
    if generation_config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=out)
    return out
