"""Train DSpark, DFlash and EAGLE-3 drafters on one machine (DSPARK.md, Training).

The target is frozen and not run during training: its features and its (top-K) next-token
distributions come from the data built by :mod:`dspark_native.training.data`. The drafter's
embedding and LM head are the target's (frozen, shared, not written to checkpoints).

One step = ``batch_sequences`` sequences x ``anchors_per_sequence`` anchors x ``block_size``
positions. Anchors are sampled among answer positions s (the block predicts s+1..s+g and sees
target features of positions < s, as in a decoding round). Batches depend only on (seed, step),
so a resumed run sees exactly the batches an uninterrupted one would.

Outputs in ``out_dir``: ``checkpoint-NNNNNN/`` (DeepSpec layout, bf16), ``final/`` (the trained
drafter), ``train_state.pt`` (fp32 weights + optimizer, for resume), ``log.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..models.config import DrafterConfig, default_target_layer_ids
from ..models.drafter import DSparkDrafter
from ..models.eagle3 import Eagle3Drafter
from ..models.layers import rope_cos_sin, sdpa
from .data import TrainingData
from .losses import ce_loss, cosine_lr, dspark_loss

KINDS = ("dspark", "dflash", "eagle3")
STATE = "train_state.pt"


@dataclass
class TrainConfig:
    """kind: dspark | dflash | eagle3. Sizes: ``num_layers`` backbone layers (EAGLE-3: always 1),
    ``markov_rank`` / ``markov_head_type`` (DSpark only), ``block_size`` drafts per round (EAGLE-3:
    its ttt_length). Optimiser: AdamW(lr, betas (0.9, 0.95), weight_decay), cosine schedule with
    ``warmup`` fraction, gradient clipping at ``clip``."""

    kind: str = "dspark"
    num_layers: int = 2
    markov_rank: int = 64
    markov_head_type: str = "vanilla"
    block_size: int = 7
    steps: int = 1000
    batch_sequences: int = 4
    anchors_per_sequence: int = 16
    lr: float = 6e-4
    warmup: float = 0.04
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    #: N > 0: a draft vocabulary of the N most frequent answer tokens of the training data
    #: (DSpark / DFlash); the LM head, W2 and the loss run over N columns. 0 = full vocabulary.
    draft_vocab: int = 0
    #: start the backbone from the target's last ``num_layers`` layers instead of random weights
    init_from_target: bool = False
    #: bf16 autocast for the forward (fp32 master weights and optimiser); faster where the CPU has
    #: bf16 matrix instructions
    bf16: bool = False
    #: start from this saved drafter's trained weights (a DeepSpec directory, e.g. the shipped
    #: drafter); its architecture, target layers and draft vocabulary must match this config
    init_from: str | None = None

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in (
            "num_layers",
            "block_size",
            "steps",
            "batch_sequences",
            "anchors_per_sequence",
            "save_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "dspark" and self.markov_rank < 1:
            raise ValueError("markov_rank must be >= 1 for a DSpark drafter (use kind='dflash' for none)")
        if not self.lr > 0 or self.clip <= 0 or not 0 <= self.warmup < 1:
            raise ValueError("lr and clip must be > 0 and warmup in [0, 1)")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0 = full vocabulary), got {self.draft_vocab}")
        if self.draft_vocab and self.kind == "eagle3":
            raise ValueError("draft_vocab: only DSpark and DFlash drafters support a draft vocabulary here")
        if self.init_from is not None and self.init_from_target:
            raise ValueError("init_from and init_from_target are exclusive: start from one of them")


def _answer_tokens(data: TrainingData) -> torch.Tensor:
    """int64 [n]: every sequence's answer tokens (prompt tokens left out), concatenated."""
    offs, starts = data.offsets.tolist(), data.answer_start.tolist()
    return torch.cat([data.tokens[o + a : e] for o, a, e in zip(offs, starts, offs[1:], strict=False)])


def draft_vocab_from_data(data: TrainingData, n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent answer tokens of the training data (the target's own generations,
    i.e. what greedy verification accepts), ties to the lower id; int64 [n] ascending. With fewer
    than ``n`` distinct answer tokens the rest is filled with the most frequent prompt tokens,
    then the lowest ids."""
    if not 1 <= n <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {n}")
    ans = _answer_tokens(data)
    counts = torch.bincount(ans, minlength=vocab_size).double() * (data.tokens.numel() + 1)
    counts += torch.bincount(data.tokens, minlength=vocab_size).double()  # prompt frequency breaks ties
    # stable descending sort: equal counts keep ascending ids
    order = torch.sort(-counts, stable=True).indices
    return order[:n].sort().values


def vocab_coverage(data: TrainingData, ids: torch.Tensor) -> float:
    """Fraction of answer tokens of ``data`` inside the draft vocabulary ``ids``."""
    ans = _answer_tokens(data)
    member = torch.zeros(int(max(int(ans.max()), int(ids.max())) + 1), dtype=torch.bool)
    member[ids] = True
    return float(member[ans].double().mean()) if ans.numel() else 0.0


def feature_layer_ids(target, target_layer_ids: list[int] | None = None) -> list[int]:
    """The target layers whose outputs a new drafter reads: ``target_layer_ids`` if given, else 5
    evenly spaced (all layers of a target with fewer than 5)."""
    if target_layer_ids:
        return list(target_layer_ids)
    n = target.config.num_hidden_layers
    return default_target_layer_ids(n, 5) if n >= 5 else list(range(n))


def new_drafter(
    target, cfg: TrainConfig, target_layer_ids: list[int] | None = None, draft_vocab_ids: torch.Tensor | None = None
) -> nn.Module:
    """A freshly initialised fp32 drafter for ``target`` (embedding / lm_head shared, frozen).
    ``draft_vocab_ids``: int64 [cfg.draft_vocab] ascending target ids (required when
    cfg.draft_vocab > 0); the head is then the target's rows of those tokens."""
    cfg.validate()
    subset = 0 < cfg.draft_vocab < target.config.vocab_size
    if subset and (draft_vocab_ids is None or draft_vocab_ids.numel() != cfg.draft_vocab):
        raise ValueError(f"new_drafter: draft_vocab = {cfg.draft_vocab} needs that many draft_vocab_ids")
    tc = target.config
    n = tc.num_hidden_layers
    ids = feature_layer_ids(target, target_layer_ids)
    raw = tc.to_dict()
    fam = "Qwen3" if tc.qk_norm else "Llama"
    raw.update(num_target_layers=n, target_layer_ids=ids, tie_word_embeddings=False)
    if cfg.kind == "eagle3":
        raw.update(architectures=[f"{fam}Eagle3Model"], num_hidden_layers=1, ttt_length=cfg.block_size)
    else:
        dspark = cfg.kind == "dspark"
        raw.update(
            architectures=[f"{fam}DSparkModel"],
            num_hidden_layers=cfg.num_layers,
            block_size=cfg.block_size,
            mask_token_id=tc.vocab_size - 1,
            markov_rank=cfg.markov_rank if dspark else 0,
            markov_head_type=cfg.markov_head_type,
            enable_confidence_head=dspark,
            confidence_head_with_markov=dspark,
        )
        if subset:
            raw["draft_vocab_size"] = cfg.draft_vocab
    dcfg = DrafterConfig.from_dict(raw)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        d = Eagle3Drafter(dcfg) if cfg.kind == "eagle3" else DSparkDrafter(dcfg)
    finally:
        torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        mh = getattr(d, "markov_head", None)
        if mh is not None:
            # Zero W2: training starts from the parallel drafter (bias 0) and W2 learns first.
            mh.markov_w2.weight.zero_()
            mh.markov_w1.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(cfg.seed + 1))
        # The frozen lm_head expects the target's final-norm scale: start from it (a transformers
        # target reports its effective scale, e.g. Gemma's 1 + weight).
        scale = target.final_norm_scale() if hasattr(target, "final_norm_scale") else target.norm.weight
        d.norm.weight.copy_(scale.detach().float())
        ch = getattr(d, "confidence_head", None)
        if ch is not None:
            ch.proj.weight.zero_()
            ch.proj.bias.zero_()
        if cfg.init_from_target and cfg.kind != "eagle3":
            # the target's last layers: a start that already maps hidden states to hidden states
            src = list(target.layers)[-len(d.layers) :]
            for dst, sl in zip(d.layers, src, strict=True):
                dst.load_state_dict({k: v.detach().float() for k, v in sl.state_dict().items()})
    d = d.float()
    head = target.lm_head.weight.detach().float()
    if dcfg.draft_vocab_size:
        d.set_draft_vocab(draft_vocab_ids)
        head = head[draft_vocab_ids]
    d.embed_tokens.weight = nn.Parameter(target.embed_tokens.weight.detach().float(), requires_grad=False)
    d.lm_head.weight = nn.Parameter(head.clone(), requires_grad=False)
    d.shared_keys = ("embed_tokens.weight", "lm_head.weight")
    return d


def _init_checkpoint(target, cfg: TrainConfig, target_layer_ids) -> tuple[dict, torch.Tensor | None]:
    """(fp32 state dict of the trained tensors, draft-vocabulary target ids or None) of the drafter
    at ``cfg.init_from``, after checking that it is the drafter ``cfg`` describes."""
    from ..engine import drafter_kind
    from ..models.loaders import load_drafter

    src = load_drafter(cfg.init_from, target, dtype=torch.float32, set_target_layers=False)
    c = src.config
    ids = feature_layer_ids(target, target_layer_ids)
    checks = [("kind", drafter_kind(src), cfg.kind), ("target_layer_ids", list(c.target_layer_ids), ids)]
    if cfg.kind != "eagle3":
        checks += [
            ("num_hidden_layers", c.num_hidden_layers, cfg.num_layers),
            ("block_size", c.block_size, cfg.block_size),
            (
                "draft_vocab_size",
                c.draft_vocab_size or 0,
                cfg.draft_vocab if cfg.draft_vocab < target.config.vocab_size else 0,
            ),
        ]
    if cfg.kind == "dspark":
        checks += [
            ("markov_rank", c.markov_rank, cfg.markov_rank),
            ("markov_head_type", c.markov_head_type, cfg.markov_head_type),
        ]
    for name, have, want in checks:
        if have != want:
            raise ValueError(f"init_from: {cfg.init_from} has {name} = {have!r}, this run wants {want!r}")
    shared = set(getattr(src, "shared_keys", ())) | {"embed_tokens.weight", "lm_head.weight"}
    state = {k: v.detach().float().clone() for k, v in src.state_dict().items() if k not in shared}
    return state, src.draft_to_target if c.draft_vocab_size else None


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """features fp32 [B, S, k*H]; tokens int64 [B, S]; anchors int64 [B, A]; block rows (all
    [B, A, g]): labels (token s+k+1), prev (token s+k), valid, position k; topk_ids int64 /
    topk_probs [B, A, g, K] (target distribution of token s+k+1)."""

    features: torch.Tensor
    tokens: torch.Tensor
    anchors: torch.Tensor
    labels: torch.Tensor
    prev: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor
    topk_ids: torch.Tensor
    topk_probs: torch.Tensor


def make_batch(data: TrainingData, seq_ids: list[int], anchors_per_seq: int, g: int, gen: torch.Generator) -> Batch:
    """Pad ``seq_ids`` to one length and sample up to ``anchors_per_seq`` distinct anchors per
    sequence among answer positions s in [answer_start, len - 2]."""
    offs = data.offsets
    lens = [int(offs[i + 1] - offs[i]) for i in seq_ids]
    B, S, A = len(seq_ids), max(lens), anchors_per_seq
    F_ = data.features.shape[1]
    feats = torch.zeros(B, S, F_)
    tokens = torch.zeros(B, S, dtype=torch.int64)
    anchors = torch.zeros(B, A, dtype=torch.int64)
    a_ok = torch.zeros(B, A, dtype=torch.bool)
    for b, (i, n) in enumerate(zip(seq_ids, lens, strict=True)):
        o = int(offs[i])
        feats[b, :n] = data.features[o : o + n].float()
        tokens[b, :n] = data.tokens[o : o + n]
        lo, hi = int(data.answer_start[i]), n - 1  # anchors lo..hi-1
        if hi > lo:
            pick = torch.randperm(hi - lo, generator=gen)[:A] + lo
            anchors[b, : pick.numel()] = pick.sort().values
            a_ok[b, : pick.numel()] = True
    k = torch.arange(g)
    pos = anchors[:, :, None] + k  # s + k
    n_t = torch.tensor(lens)[:, None, None]
    valid = a_ok[:, :, None] & (pos + 1 < n_t)
    pc = pos.clamp(max=S - 1)
    labels = torch.where(
        valid, tokens.gather(1, (pos + 1).clamp(max=S - 1).reshape(B, -1)).reshape(B, A, g), torch.full_like(pos, -1)
    )
    prev = tokens.gather(1, pc.reshape(B, -1)).reshape(B, A, g)
    glob = torch.tensor([int(offs[i]) for i in seq_ids])[:, None, None] + pc.clamp(max=(n_t - 1))
    return Batch(
        feats,
        tokens,
        anchors,
        labels,
        prev,
        valid,
        k.expand(B, A, g).clone(),
        data.topk_ids[glob],
        data.topk_probs[glob],
    )


def batch_for_step(data: TrainingData, cfg: TrainConfig, step: int) -> Batch:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    seq = torch.randint(0, data.num_sequences, (cfg.batch_sequences,), generator=gen).tolist()
    return make_batch(data, seq, cfg.anchors_per_sequence, cfg.block_size, gen)


# ----------------------------------------------------------------------------- forwards


def dspark_forward(d: DSparkDrafter, b: Batch):
    """Teacher-forced DSpark / DFlash forward -> (z fp32 [B, A, g, V], conf logit fp32
    [B, A, g] or None)."""
    B, A, g = b.labels.shape
    ids = torch.full((B, A, g), d.config.mask_token_id, dtype=torch.int64)
    ids[:, :, 0] = b.prev[:, :, 0]
    U, h = d.forward_train(b.features, ids, b.anchors)
    z, e = U, None
    if d.markov_head is not None:
        bias, e = d.markov_head.teacher_forced(b.prev, h)
        z = U + bias
    conf = None
    if d.confidence_head is not None:
        conf = d.confidence_head.logit(h, e if d.config.confidence_head_with_markov else None)
    return z, conf


def eagle3_forward(d: Eagle3Drafter, b: Batch) -> torch.Tensor:
    """EAGLE-3 with training-time test: step 0 runs causally over every position with target
    features; steps 1..g-1 run per anchor chain on the drafter's own previous output, attending
    to the target-feature pairs before the anchor and to the chain's earlier steps (exactly
    what :meth:`Eagle3Drafter.propose` sees). Returns logits fp32 [B, A, g, V]; row (a, k)
    predicts token s+k+1."""
    layer = d.layers[0]
    att = layer.self_attn
    B, S = b.tokens.shape
    A, g = b.anchors.shape[1], b.labels.shape[2]
    cfgd = d.config
    G0 = d.fc(b.features)
    nxt = torch.cat([b.tokens[:, 1:], torch.zeros(B, 1, dtype=torch.int64)], 1)
    x0 = torch.cat([layer.input_layernorm(d.embed_tokens(nxt)), layer.hidden_norm(G0)], -1)
    cos, sin = rope_cos_sin(torch.arange(S).expand(B, S), cfgd.head_dim, cfgd.rope_theta, x0.dtype, cfgd.rope_scaling)
    q0 = att.q(x0, cos, sin).transpose(1, 2)
    k0, v0 = att.kv(x0, cos, sin)
    k0, v0 = k0.transpose(1, 2), v0.transpose(1, 2)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    h0 = layer.finish(G0, sdpa(q0, k0, v0, causal).transpose(1, 2).flatten(2))
    t0 = (b.anchors - 1).clamp_min(0)  # step 0 of a chain sits at s - 1 (pending feature)
    H = h0.shape[-1]
    c = h0.gather(1, t0[:, :, None].expand(B, A, H))
    outs = [c]
    ctx_ok = torch.arange(S)[None, None, :] <= t0[:, :, None]  # [B, A, S]
    ck, cv = [], []
    for j in range(1, g):
        tok = b.prev[:, :, j]  # token s + j (teacher forced = the accepted draft j-1)
        x = torch.cat([layer.input_layernorm(d.embed_tokens(tok)), layer.hidden_norm(c)], -1)
        cs, sn = rope_cos_sin(t0 + j, cfgd.head_dim, cfgd.rope_theta, x.dtype, cfgd.rope_scaling)
        q = att.q(x, cs, sn).transpose(1, 2)  # [B, Hq, A, hd]
        k, v = att.kv(x, cs, sn)
        ck.append(k)
        cv.append(v)
        Kc = torch.stack(ck, 2).flatten(1, 2).transpose(1, 2)  # [B, kvh, A*j, hd], chain-major
        Vc = torch.stack(cv, 2).flatten(1, 2).transpose(1, 2)
        own = (torch.arange(A)[:, None] == torch.arange(A * j)[None, :] // j).expand(B, A, A * j)
        mask = torch.cat([ctx_ok, own], 2)[:, None]
        attn = sdpa(q, torch.cat([k0, Kc], 2), torch.cat([v0, Vc], 2), mask).transpose(1, 2).flatten(2)
        c = layer.finish(c, attn)
        outs.append(c)
    return d.lm_head(d.norm(torch.stack(outs, 2))).float()


def step_loss(d, kind: str, b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch for a drafter of ``kind``; the stats include acc@k (greedy top-1 match
    of the label at block position k, teacher forced)."""
    flat = lambda t: t.reshape(-1, *t.shape[3:])  # noqa: E731
    if kind == "eagle3":
        z = eagle3_forward(d, b)
        loss, st = ce_loss(flat(z), flat(b.labels), flat(b.position), flat(b.valid))
    else:
        z, conf = dspark_forward(d, b)
        # with a draft vocabulary the loss runs over the N draft columns: labels and the target's
        # top-K ids become columns, -1 outside (no CE for such a row; its target mass counts in L1)
        t2d = d.target_to_draft
        labels = b.labels if t2d is None else torch.where(b.labels >= 0, t2d[b.labels.clamp_min(0)], -1)
        if kind == "dspark":
            topk = b.topk_ids if t2d is None else t2d[b.topk_ids]
            loss, st = dspark_loss(
                flat(z),
                flat(labels),
                flat(b.position),
                flat(b.valid),
                flat(topk),
                flat(b.topk_probs),
                None if conf is None else conf.reshape(-1),
            )
        else:
            loss, st = ce_loss(flat(z), flat(labels), flat(b.position), flat(b.valid))
    with torch.no_grad():
        pred = z.argmax(-1)
        if kind != "eagle3" and d.draft_to_target is not None:
            pred = d.draft_to_target[pred]
        hit = (pred == b.labels) & b.valid
        n = b.valid.sum((0, 1)).clamp_min(1)
        st["acc"] = (hit.sum((0, 1)).float() / n).tolist()
        st["rows"] = int(b.valid.sum())
        # greedy tau of these blocks, teacher forced: 1 + leading hits (the training data is the
        # target's greedy output, so this is what a greedy decoding round would accept)
        lead = torch.cumprod(hit.long(), -1).sum(-1)
        ok = b.valid[:, :, 0]
        st["tau"] = float((lead[ok] + 1).float().mean()) if bool(ok.any()) else 0.0
    return loss, st


# ----------------------------------------------------------------------------- loop


@torch.no_grad()
def dev_metrics(d, cfg: TrainConfig, dev: TrainingData, batches: int = 8) -> dict:
    """Teacher-forced greedy tau (1 + leading exact matches per block) and acc@k over ``batches``
    fixed batches of held-out sequences (the same batches at every call: seed 12345)."""
    was = d.training
    d.eval()
    dc = TrainConfig(**{**asdict(cfg), "seed": 12345})
    taus, accs, rows = [], [], []
    for i in range(batches):
        b = batch_for_step(dev, dc, i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            _, st = step_loss(d, cfg.kind, b)
        n = int(b.valid[:, :, 0].sum())
        taus.append(st["tau"] * n)
        accs.append(torch.tensor(st["acc"]) * n)
        rows.append(n)
    d.train(was)
    total = max(1, sum(rows))
    return dict(tau=sum(taus) / total, acc=(sum(accs) / total).tolist(), blocks=sum(rows))


def _trainable(d) -> list[nn.Parameter]:
    return [p for p in d.parameters() if p.requires_grad]


def _save_checkpoint(d, directory: str) -> None:
    from ..models.loaders import save_drafter

    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_drafter(d, tmp, dtype=torch.bfloat16, include_shared=False)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def train(
    target,
    data: TrainingData,
    cfg: TrainConfig,
    out_dir: str,
    resume: bool = True,
    target_layer_ids: list[int] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    dev: TrainingData | None = None,
) -> nn.Module:
    """Train (or resume) a drafter; returns it (fp32, train mode off).

    ``stop_after``: return after this many steps of this call (simulates an interruption; used by
    tests). The final drafter is written to ``out_dir/final`` when ``cfg.steps`` are done.
    ``dev``: held-out sequences; at every checkpoint the log gets their teacher-forced greedy tau
    and acc@k (:func:`dev_metrics`).
    """
    cfg.validate()
    os.makedirs(out_dir, exist_ok=True)
    spath = os.path.join(out_dir, STATE)
    st = None
    if resume and os.path.exists(spath):
        st = torch.load(spath, weights_only=False)
        if st["config"] != asdict(cfg):
            raise ValueError(
                f"{out_dir}: its training state has another configuration "
                f"({st['config']}); use a new directory or resume=False"
            )
    vocab_ids = None
    start = _init_checkpoint(target, cfg, target_layer_ids) if cfg.init_from is not None and st is None else None
    if cfg.draft_vocab and cfg.draft_vocab < target.config.vocab_size:
        # a resumed run keeps the vocabulary it started with, even if the data has grown since
        if st is not None and st.get("draft_vocab_ids") is not None:
            vocab_ids = st["draft_vocab_ids"]
        elif start is not None:
            vocab_ids = start[1]
        else:
            vocab_ids = draft_vocab_from_data(data, cfg.draft_vocab, target.config.vocab_size)
        if progress:
            print(
                f"[train] draft vocabulary: {vocab_ids.numel()} of {target.config.vocab_size} tokens, "
                f"{100 * vocab_coverage(data, vocab_ids):.2f}% of the training answer tokens",
                file=sys.stderr,
            )
    d = new_drafter(target, cfg, target_layer_ids, vocab_ids)
    if start is not None:
        with torch.no_grad():
            d.load_state_dict(start[0], strict=False)
        if progress:
            print(f"[train] starting from the weights of {cfg.init_from}", file=sys.stderr)
    opt = torch.optim.AdamW(_trainable(d), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = 0
    if st is not None:
        d.load_state_dict(st["model"], strict=False)
        opt.load_state_dict(st["optimizer"])
        step = st["step"]
        if progress:
            print(f"[train] resumed from step {step}", file=sys.stderr)
    if data.num_sequences < 1:
        raise ValueError("training data has no sequence")
    d.train()
    log = open(os.path.join(out_dir, "log.jsonl"), "a", encoding="utf-8")
    t0, rows0, ran = time.perf_counter(), 0, 0
    try:
        while step < cfg.steps and (stop_after is None or ran < stop_after):
            lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
            for gr in opt.param_groups:
                gr["lr"] = lr
            b = batch_for_step(data, cfg, step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, st = step_loss(d, cfg.kind, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(_trainable(d), cfg.clip))
            opt.step()
            step += 1
            ran += 1
            rows0 += st["rows"]
            if step % cfg.log_every == 0 or step == cfg.steps:
                el = time.perf_counter() - t0
                rec = dict(step=step, lr=lr, grad_norm=gnorm, tokens_per_s=rows0 / el, **st)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if progress:
                    extra = "".join(f" {k} {st[k]:.3f}" for k in ("ce", "l1", "bce") if k in st)
                    eta = (cfg.steps - step) * el / ran
                    print(
                        f"[train {cfg.kind}] step {step}/{cfg.steps} loss {st['loss']:.3f}{extra} "
                        f"acc@0 {st['acc'][0]:.2f} tau {st['tau']:.2f} lr {lr:.2e} {rows0 / el:.0f} rows/s "
                        f"eta {eta / 60:.1f} min",
                        file=sys.stderr,
                        flush=True,
                    )
            if step % cfg.save_every == 0 or step == cfg.steps:
                state = dict(
                    step=step,
                    config=asdict(cfg),
                    optimizer=opt.state_dict(),
                    model={k: v for k, v in d.state_dict().items() if k not in d.shared_keys},
                    draft_vocab_ids=vocab_ids,
                )
                torch.save(state, spath + ".tmp")
                os.replace(spath + ".tmp", spath)
                _save_checkpoint(d, os.path.join(out_dir, f"checkpoint-{step:06d}"))
                if dev is not None and dev.num_sequences:
                    dm = dev_metrics(d, cfg, dev)
                    d.train()
                    log.write(json.dumps(dict(step=step, **{f"dev_{k}": v for k, v in dm.items()})) + "\n")
                    log.flush()
                    if progress:
                        print(
                            f"[train {cfg.kind}] step {step} dev tau {dm['tau']:.3f} acc@0 {dm['acc'][0]:.3f}",
                            file=sys.stderr,
                            flush=True,
                        )
                for old in sorted(x for x in os.listdir(out_dir) if x.startswith("checkpoint-"))[:-2]:
                    shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    finally:
        log.close()
    d.eval()
    if step >= cfg.steps:
        _save_checkpoint(d, os.path.join(out_dir, "final"))
    return d
