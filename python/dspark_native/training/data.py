"""Training data for drafters, built online from the target (no precomputed hub cache).

As DeepSpec does, the target *regenerates* the answers: every prompt is wrapped in the chat
template and answered by the target itself (greedy), so the drafter learns the distribution it
will be verified against. The rows training needs are captured while the answer is generated
(one ragged prefill of the prompts, then batched greedy decode steps: what the engine computes
when it serves the drafter, and nothing computed twice):

* ``features``  bf16 [S, k*H]: raw outputs of the drafter's ``target_layer_ids`` (context input);
* ``topk_ids`` int32 [S, K] and ``topk_probs`` fp16 [S, K]: the target's next-token distribution
  at T = 1, truncated to its K most likely tokens (the rest is kept as one "residual" mass). This
  is the compact form of the target logits: K = 32 stores 192 bytes a token instead of 4*V.
  Training reads it at answer rows only, so prompt rows before the last hold ids -1 / probs 0.

Shards (``shard_00000.safetensors``, ...) hold whole sequences and are written atomically; the
manifest lists finished shards, so an interrupted build resumes at the first missing shard. The
prompt order is fixed by (files, limit, seed), so a resumed build produces the same data.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

MANIFEST = "manifest.json"
#: 2: rows captured while generating (one pass); the prompt rows before the last have no
#: distribution (topk_ids -1). 1: a second prefill over prompt + answer. Both load.
DATA_VERSION = 2


@dataclass
class DataConfig:
    """What to generate. ``files``: JSONL prompt files ({"turns": [...]}; first turn used);
    ``limit_per_file``: prompts taken from each file (after dropping prompts longer than
    ``max_prompt_tokens``); answers of at most ``max_new_tokens`` tokens, ``batch`` prompts
    decoded together; ``sequences_per_shard`` sequences a shard; ``topk`` K of the stored target
    distribution; ``seed`` the prompt-order shuffle. ``skip_per_file`` > 0 leaves out each file's
    first ``skip_per_file`` prompts that fit ``skip_max_prompt_tokens`` (0: ``max_prompt_tokens``),
    i.e. what an earlier build with those limits took, so a second build adds new prompts only."""

    files: list[str]
    limit_per_file: int = 200
    max_prompt_tokens: int = 320
    max_new_tokens: int = 256
    batch: int = 16
    sequences_per_shard: int = 32
    topk: int = 32
    seed: int = 0
    target_layer_ids: list[int] = field(default_factory=list)
    skip_per_file: int = 0
    skip_max_prompt_tokens: int = 0


def _read_prompts(path: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                turns = json.loads(line)["turns"]
                if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0].strip():
                    out.append(turns[0])
                    continue
            except (ValueError, KeyError, TypeError):
                pass
            print(f"{path}:{n}: malformed prompt line skipped", file=sys.stderr)
    return out


def select_prompts(cfg: DataConfig, encode: Callable[[str], list[int]]) -> list[tuple[str, list[int]]]:
    """(domain, prompt ids) in the build order: each file's first ``limit_per_file`` prompts that
    fit ``max_prompt_tokens``, the files interleaved round-robin (any prefix of the data mixes
    the domains), then shuffled within blocks of one shard with ``seed``."""
    per_file = []
    skip_max = cfg.skip_max_prompt_tokens or cfg.max_prompt_tokens
    for path in cfg.files:
        dom = os.path.splitext(os.path.basename(path))[0]
        chosen = []
        skipped = 0
        for text in _read_prompts(path):
            ids = encode(text)
            if skipped < cfg.skip_per_file and len(ids) <= skip_max:
                skipped += 1  # an earlier build's prompt
                continue
            if len(ids) <= cfg.max_prompt_tokens:
                chosen.append((dom, ids))
            if len(chosen) >= cfg.limit_per_file:
                break
        per_file.append(chosen)
    order = []
    for i in range(max((len(c) for c in per_file), default=0)):
        order += [c[i] for c in per_file if i < len(c)]
    rng = random.Random(cfg.seed)
    n = cfg.sequences_per_shard
    out = []
    for s in range(0, len(order), n):
        block = order[s : s + n]
        rng.shuffle(block)
        out += block
    return out


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _generate_rows(target, prompts: Sequence[list[int]], max_new_tokens: int, eos_ids: Sequence[int], topk: int):
    """Greedy answers of ``prompts`` together with the rows training needs, in one pass.

    One ragged prefill of all prompts (features only, logits of each prompt's last row), then
    batched decode steps; every step's features and next-token distribution are the rows of the
    token it fed, so nothing is recomputed afterwards. Each sequence's final token is fed once
    more, so its row has real features too. Rows of the prompt before its last one get
    ``topk_ids`` -1 / ``topk_probs`` 0: training reads distributions at answer rows only.

    Returns (answers: list of token lists, features bf16 [S, k*H], topk_ids int32 [S, K],
    topk_probs fp16 [S, K]) with S = sum(len(prompt) + len(answer)), sequences in order.
    """
    B = len(prompts)
    stop = set(int(e) for e in eos_ids)
    lens = [len(p) for p in prompts]
    cache = target.new_cache(B, max(lens) + max_new_tokens + 1)
    cu = torch.tensor([0] + lens).cumsum(0)
    x = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)
    logits, hid = target(x, cu, torch.arange(B), cache, logit_rows="last")
    hid = hid.to(torch.bfloat16)
    feats = [[hid[int(cu[i]) : int(cu[i + 1])]] for i in range(B)]
    ids = [[torch.full((n - 1, topk), -1, dtype=torch.int32)] for n in lens]
    probs = [[torch.zeros(n - 1, topk, dtype=torch.float16)] for n in lens]
    answers: list[list[int]] = [[] for _ in range(B)]

    def keep_rows(seqs, logits):  # the next-token distribution of each sequence's last fed row
        pv, pi = torch.softmax(logits.float(), -1).topk(topk, -1)
        for j, i in enumerate(seqs):
            ids[i].append(pi[j : j + 1].to(torch.int32))
            probs[i].append(pv[j : j + 1].to(torch.float16))

    live = list(range(B))  # sequences whose next token is still to be chosen, rows of logits
    keep_rows(live, logits)
    while live:
        nxt = logits.argmax(-1).tolist()
        going = set()
        for j, i in enumerate(live):
            answers[i].append(nxt[j])
            if nxt[j] not in stop and len(answers[i]) < max_new_tokens:
                going.add(i)
        # every chosen token is fed, the final ones too, so each row has real features
        x = torch.tensor(nxt, dtype=torch.int64)
        logits, hid = target(x, torch.arange(len(live) + 1), torch.tensor(live), cache)
        hid = hid.to(torch.bfloat16)
        for j, i in enumerate(live):
            feats[i].append(hid[j : j + 1])
        keep_rows(live, logits)
        rows = [j for j, i in enumerate(live) if i in going]
        logits = logits[rows]
        live = [live[j] for j in rows]
    return (
        answers,
        torch.cat([torch.cat(f) for f in feats]),
        torch.cat([torch.cat(t) for t in ids]),
        torch.cat([torch.cat(t) for t in probs]),
    )


def build_training_data(
    target,
    encode: Callable[[str], list[int]],
    eos_ids: Sequence[int],
    cfg: DataConfig,
    out_dir: str,
    max_sequences: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate (or resume) the training data in ``out_dir``; returns the manifest.

    ``target``: TargetModel (its target_layer_ids are set to ``cfg.target_layer_ids``);
    ``encode(text) -> prompt ids`` with the chat template applied. Raises ValueError when
    ``out_dir`` holds data built with a different configuration.
    """
    from safetensors.torch import save_file

    if not cfg.files:
        raise ValueError("DataConfig.files: at least one prompt file is needed")
    for p in cfg.files:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"prompt file {p} does not exist")
    if cfg.topk < 1 or cfg.batch < 1 or cfg.sequences_per_shard < 1 or cfg.max_new_tokens < 1:
        raise ValueError("topk, batch, sequences_per_shard and max_new_tokens must be >= 1")
    if cfg.skip_per_file < 0 or cfg.skip_max_prompt_tokens < 0:
        raise ValueError("skip_per_file and skip_max_prompt_tokens must be >= 0")
    os.makedirs(out_dir, exist_ok=True)
    target.set_target_layer_ids(list(cfg.target_layer_ids))
    mpath = os.path.join(out_dir, MANIFEST)
    # Files are compared by name, so the same data can be resumed from another checkout.
    conf = dict(asdict(cfg), files=[os.path.basename(f) for f in cfg.files])
    for k in ("skip_per_file", "skip_max_prompt_tokens"):  # absent from builds made before them
        if not conf[k]:
            del conf[k]
    want = dict(
        version=DATA_VERSION, config=conf, hidden_size=target.config.hidden_size, vocab_size=target.config.vocab_size
    )
    if os.path.exists(mpath):
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        old = {k: manifest.get(k) for k in want}
        if old != want:
            raise ValueError(
                f"{out_dir} holds training data built with another configuration; use a new directory (or delete it)"
            )
    else:
        manifest = dict(want, shards=[])
        _atomic_json(mpath, manifest)
    prompts = select_prompts(cfg, encode)
    if max_sequences is not None:
        prompts = prompts[:max_sequences]
    n_shard = cfg.sequences_per_shard
    shards = [prompts[i : i + n_shard] for i in range(0, len(prompts), n_shard)]
    done = {s["file"] for s in manifest["shards"]}
    t0, made = time.perf_counter(), 0
    for si, shard in enumerate(shards):
        name = f"shard_{si:05d}.safetensors"
        if name in done:
            continue
        answers, feats, tids, tprobs = [], [], [], []
        for c in range(0, len(shard), cfg.batch):
            got = _generate_rows(
                target, [p for _, p in shard[c : c + cfg.batch]], cfg.max_new_tokens, eos_ids, cfg.topk
            )
            answers += got[0]
            feats.append(got[1])
            tids.append(got[2])
            tprobs.append(got[3])
        feats, tids, tprobs = torch.cat(feats), torch.cat(tids), torch.cat(tprobs)
        seqs = [p + a for (_, p), a in zip(shard, answers, strict=True)]
        lens = torch.tensor([len(s) for s in seqs])
        tensors = dict(
            tokens=torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
            offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]),
            answer_start=torch.tensor([len(p) for _, p in shard], dtype=torch.int64),
            features=feats.contiguous(),
            topk_ids=tids.contiguous(),
            topk_probs=tprobs.contiguous(),
        )
        tmp = os.path.join(out_dir, name + ".tmp")
        save_file(tensors, tmp, metadata=dict(domains=json.dumps([d for d, _ in shard])))
        os.replace(tmp, os.path.join(out_dir, name))
        manifest["shards"].append(
            dict(
                file=name,
                sequences=len(seqs),
                tokens=int(lens.sum()),
                answer_tokens=int(sum(len(a) for a in answers)),
                domains=[d for d, _ in shard],
            )
        )
        _atomic_json(mpath, manifest)
        made += int(sum(len(a) for a in answers))
        if progress:
            el = time.perf_counter() - t0
            print(
                f"[data] shard {si + 1}/{len(shards)}: {sum(s['sequences'] for s in manifest['shards'])} sequences, "
                f"{made} answer tokens generated in {el:.0f} s ({made / el:.1f} tok/s)",
                file=sys.stderr,
                flush=True,
            )
    return manifest


@dataclass
class TrainingData:
    """All shards in memory. Per sequence i: tokens[offsets[i]:offsets[i+1]] and the rows of
    ``features`` / ``topk_*`` at the same positions; ``answer_start[i]`` = prompt length."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    answer_start: torch.Tensor
    features: torch.Tensor
    topk_ids: torch.Tensor
    topk_probs: torch.Tensor
    domains: list[str]

    @property
    def num_sequences(self) -> int:
        return self.answer_start.numel()

    def split(self, holdout: int) -> tuple[TrainingData, TrainingData]:
        """(train, held-out): the last ``holdout`` sequences are held out."""
        n = self.num_sequences - holdout
        if n < 1 or holdout < 0:
            raise ValueError(f"cannot hold out {holdout} of {self.num_sequences} sequences")
        cut = int(self.offsets[n])
        a = TrainingData(
            self.tokens[:cut],
            self.offsets[: n + 1],
            self.answer_start[:n],
            self.features[:cut],
            self.topk_ids[:cut],
            self.topk_probs[:cut],
            self.domains[:n],
        )
        b = TrainingData(
            self.tokens[cut:],
            self.offsets[n:] - cut,
            self.answer_start[n:],
            self.features[cut:],
            self.topk_ids[cut:],
            self.topk_probs[cut:],
            self.domains[n:],
        )
        return a, b


def load_training_data(out_dir: str | Sequence[str]) -> TrainingData:
    """Read every finished shard listed in the manifest of ``out_dir`` (or of several data
    directories, concatenated in the order given)."""
    if not isinstance(out_dir, str):
        parts = [load_training_data(d) for d in out_dir]
        if not parts:
            raise ValueError("load_training_data: no data directory given")
        return concat_training_data(parts)
    from safetensors import safe_open

    mpath = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"{out_dir}: no {MANIFEST} (build the data with `dspark-native train --data-dir`)")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    if not manifest["shards"]:
        raise ValueError(f"{out_dir}: no finished shard yet")
    parts = {k: [] for k in ("tokens", "offsets", "answer_start", "features", "topk_ids", "topk_probs")}
    domains: list[str] = []
    base = 0
    for s in manifest["shards"]:
        with safe_open(os.path.join(out_dir, s["file"]), "pt") as f:
            for k in parts:
                t = f.get_tensor(k)
                if k == "offsets":  # rebase; the closing offset is added once at the end
                    t = (t + base)[:-1]
                parts[k].append(t)
            base += int(f.get_tensor("offsets")[-1])
        domains += s["domains"]
    offsets = torch.cat(parts["offsets"] + [torch.tensor([base])])
    return TrainingData(
        torch.cat(parts["tokens"]).long(),
        offsets,
        torch.cat(parts["answer_start"]),
        torch.cat(parts["features"]),
        torch.cat(parts["topk_ids"]).long(),
        torch.cat(parts["topk_probs"]),
        domains,
    )


def concat_training_data(parts: Sequence[TrainingData]) -> TrainingData:
    """The sequences of ``parts`` one after another (features of one width)."""
    widths = {p.features.shape[-1] for p in parts}
    if len(widths) != 1:
        raise ValueError(f"training data with different feature widths cannot be combined: {sorted(widths)}")
    offs, base = [], 0
    for p in parts:
        offs.append(p.offsets[:-1] + base)
        base += int(p.offsets[-1])
    return TrainingData(
        torch.cat([p.tokens for p in parts]),
        torch.cat(offs + [torch.tensor([base])]),
        torch.cat([p.answer_start for p in parts]),
        torch.cat([p.features for p in parts]),
        torch.cat([p.topk_ids for p in parts]),
        torch.cat([p.topk_probs for p in parts]),
        [d for p in parts for d in p.domains],
    )
