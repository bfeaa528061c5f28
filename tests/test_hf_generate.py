"""DSpark inside transformers' generate (``custom_generate=dspark_generate``): greedy output
identical to ``generate`` without it (left-padded batches, EOS, a custom stopping criterion,
return_dict_in_generate), sampled output with temperature / top-k / top-p following the
distribution transformers' own processors define (chi-square at ALPHA = 1e-3, tests/stats.py,
fixed seeds), and the settings it refuses by name."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import aligned_drafter, bigram_perm, write_hf_model  # noqa: E402
from stats import assert_matches_distribution  # noqa: E402

from dspark_native.hf_generate import dspark_generate  # noqa: E402
from dspark_native.models import load_target  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _quiet_one_thread():
    from transformers.utils import logging as hf_logging

    n, level = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    torch.set_num_threads(n)
    hf_logging.set_verbosity(level)
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3", "mistral"])
def setup(request, tmp_path_factory):
    d = write_hf_model(str(tmp_path_factory.mktemp(request.param)), request.param, seed=3, bigram=1.5)
    target = load_target(d, backend="transformers")
    return target.hf, aligned_drafter(target, bigram_perm(d), block_size=4)


def test_greedy_equals_plain_generate(setup):
    model, drafter = setup
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 9, 10], [0, 11, 12, 13, 14, 15]])
    am = (torch.arange(6)[None, :] >= torch.tensor([[3], [0], [1]])).long()
    plain = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=24)
    got = model.generate(
        ids, attention_mask=am, do_sample=False, max_new_tokens=24, custom_generate=dspark_generate, drafter=drafter
    )
    assert torch.equal(got, plain), (got, plain)
    stats = [o.stats for o in model.dspark_last_outputs]
    assert sum(s.accepted_drafts for s in stats) > 0, "test premise: drafts get accepted"
    # EOS met inside a block: the sequence ends there and is padded like transformers pads it
    eos = int(plain[1, 6 + 9])
    want = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    got = model.generate(
        ids,
        attention_mask=am,
        do_sample=False,
        max_new_tokens=24,
        eos_token_id=eos,
        pad_token_id=0,
        custom_generate=dspark_generate,
        drafter=drafter,
        return_dict_in_generate=True,
    )
    assert torch.equal(got.sequences, want)


def test_custom_stopping_criterion(setup):
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, drafter = setup
    ids = torch.tensor([[1, 2, 3]])
    plain = model.generate(ids, do_sample=False, max_new_tokens=20)
    stop_tok = int(plain[0, 3 + 7])

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return input_ids[:, -1] == stop_tok

    want = model.generate(ids, do_sample=False, max_new_tokens=20, stopping_criteria=StoppingCriteriaList([StopAt()]))
    got = model.generate(
        ids,
        do_sample=False,
        max_new_tokens=20,
        stopping_criteria=StoppingCriteriaList([StopAt()]),
        custom_generate=dspark_generate,
        drafter=drafter,
    )
    assert torch.equal(got, want) and got.shape[1] < plain.shape[1]


def test_refused_settings_are_named(setup):
    model, drafter = setup
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="drafter="):
        model.generate(ids, max_new_tokens=4, custom_generate=dspark_generate)
    with pytest.raises(NotImplementedError, match="RepetitionPenaltyLogitsProcessor"):
        model.generate(ids, max_new_tokens=4, repetition_penalty=1.3, custom_generate=dspark_generate, drafter=drafter)
    with pytest.raises(NotImplementedError, match="MinPLogitsWarper"):
        model.generate(
            ids, max_new_tokens=4, do_sample=True, min_p=0.1, custom_generate=dspark_generate, drafter=drafter
        )
    with pytest.raises(NotImplementedError, match="output_scores"):
        model.generate(
            ids,
            max_new_tokens=4,
            output_scores=True,
            return_dict_in_generate=True,
            custom_generate=dspark_generate,
            drafter=drafter,
        )


V, N_TOK, N = 8, 2, 3000


@torch.no_grad()
def test_sampling_follows_transformers_processors(tmp_path):
    """do_sample with temperature 1.5, top_k 4, top_p 0.85 (dropping any one of the three changes
    the distribution): the exact distribution is built with transformers' own warpers, in its
    order, on its cache-free logits."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    d = write_hf_model(str(tmp_path / "m"), "gemma3", seed=5, bigram=0.15, V=V, eos_token_id=None)
    target = load_target(d)
    model = target.hf
    drafter = aligned_drafter(target, bigram_perm(d), block_size=2, rank=8, markov_scale=3.0)
    prompt = [1, 2]
    warp = LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(4), TopPLogitsWarper(0.85)])
    probs = torch.ones(1, dtype=torch.float64)
    prefixes = [[]]
    for _ in range(N_TOK):
        batch = torch.tensor([prompt + p for p in prefixes])
        logits = model(batch, use_cache=False).logits[:, -1].float()
        step = torch.softmax(warp(batch, logits).double(), -1)
        probs = (probs[:, None] * step).reshape(-1)
        prefixes = [p + [v] for p in prefixes for v in range(V)]
    assert int((probs == 0).sum()) > 0, "test premise: top-k / top-p remove tokens"
    out = model.generate(
        torch.tensor([prompt] * N),
        do_sample=True,
        temperature=1.5,
        top_k=4,
        top_p=0.85,
        max_new_tokens=N_TOK,
        custom_generate=dspark_generate,
        drafter=drafter,
        dspark_seed=11,
    )
    new = out[:, len(prompt) :]
    assert new.shape == (N, N_TOK)
    assert_matches_distribution(new[:, 0] * V + new[:, 1], probs, "generate(do_sample) with DSpark")
    assert sum(o.stats.accepted_drafts for o in model.dspark_last_outputs) > N // 20, "test premise"
