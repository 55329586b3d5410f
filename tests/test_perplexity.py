"""Perplexity: the papers' non-overlapping-window convention, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ast_core import data
from ast_core.masks import magnitude_score, nm_mask
from ast_core.models import load_model
from ast_core.perplexity import PerplexityResult, perplexity, wikitext2_perplexity
from ast_core.sparse import sparse_layers, sparsify


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny:llama", seed=0)


def hand_nll_per_window(model, ids: torch.Tensor, seq_len: int, n_windows: int) -> list[float]:
    """Mean NLL of each window's seq_len-1 next-token predictions, via an explicit log-softmax."""
    out = []
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * seq_len:(w + 1) * seq_len]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), dim=-1)
            picked = logp[torch.arange(seq_len - 1), x[1:]]
            out.append(-picked.mean().item())
    return out


def test_perplexity_equals_explicit_log_softmax_nll_over_full_windows(tiny_llama):
    seq_len = 16
    ids = torch.randint(0, tiny_llama.config.vocab_size, (5 * seq_len + 7,))  # 7 tokens of a partial window
    res = perplexity(tiny_llama, ids[None], seq_len)
    per_window = hand_nll_per_window(tiny_llama, ids, seq_len, 5)
    assert res.windows == 5 and res.tokens == 5 * (seq_len - 1)
    assert res.nll_mean == pytest.approx(sum(per_window) / 5, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(sum(per_window) / 5), rel=1e-5)
    assert res.ppl > 1000  # a random model is near-uniform over ~49k tokens


def test_perplexity_is_the_papers_labels_loss_times_seqlen_formula(tiny_llama):
    seq_len = 32
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 3 * seq_len))
    with torch.no_grad():
        nlls = [tiny_llama(w, labels=w).loss.item() * seq_len for w in ids.view(3, 1, seq_len)]
    paper_ppl = math.exp(sum(nlls) / (3 * seq_len))
    assert perplexity(tiny_llama, ids, seq_len).ppl == pytest.approx(paper_ppl, rel=1e-5)


def test_batching_list_input_and_max_windows_do_not_change_the_numbers(tiny_llama):
    seq_len = 8
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 6 * seq_len + 3))
    one = perplexity(tiny_llama, ids, seq_len)
    batched = perplexity(tiny_llama, ids[0].tolist(), seq_len, batch_size=4)
    assert batched.windows == one.windows == 6
    assert batched.nll_mean == pytest.approx(one.nll_mean, rel=1e-5)
    first2 = perplexity(tiny_llama, ids, seq_len, max_windows=2)
    assert first2.windows == 2
    assert first2.nll_mean == pytest.approx(sum(hand_nll_per_window(tiny_llama, ids[0], seq_len, 2)) / 2, rel=1e-5)



def test_progress_bar_counts_batches_and_leaves_the_numbers_alone(tiny_llama, capsys):
    seq_len = 8
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 5 * seq_len))
    quiet = perplexity(tiny_llama, ids, seq_len, batch_size=2)
    assert capsys.readouterr().err == ""
    shown = perplexity(tiny_llama, ids, seq_len, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert shown.nll_mean == quiet.nll_mean
    assert "perplexity" in err and "3/3" in err  # 5 windows in batches of 2
    assert f"ppl={quiet.ppl:.3f}" in err  # the running value ends at the result

def test_perplexity_on_gpt2_conv1d_model_matches_hand_computation():
    model = load_model("tiny:gpt2", seed=1)
    ids = torch.randint(0, model.config.vocab_size, (3 * 12,))
    res = perplexity(model, ids, 12)
    assert res.nll_mean == pytest.approx(sum(hand_nll_per_window(model, ids, 12, 3)) / 3, rel=1e-5)


def test_perplexity_restores_training_mode_and_keeps_no_grad(tiny_llama):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, torch.arange(40), 8)
        assert tiny_llama.training
        assert all(p.grad is None for p in tiny_llama.parameters())
    finally:
        tiny_llama.eval()


@pytest.mark.parametrize("ids,seq_len,match", [
    (torch.arange(10), 16, "10 tokens give no full window"),
    (torch.arange(600), 513, "exceeds the model's 512 positions"),
    (torch.zeros(2, 40, dtype=torch.long), 8, r"one stream \[1, N\]"),
    (torch.arange(10), 1, "seq_len must be >= 2"),
])
def test_perplexity_rejects_unusable_inputs(tiny_llama, ids, seq_len, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_llama, ids, seq_len)


def test_smollm2_tokenizer_adds_no_special_tokens_to_the_eval_text(smollm2_tokenizer):
    text = " = Robert Boulter = \n\n\n"
    plain = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    default = smollm2_tokenizer(text, return_tensors="pt")["input_ids"][0].tolist()
    assert default == plain and smollm2_tokenizer.bos_token_id not in default


def test_wikitext2_perplexity_tokenizes_the_eval_text_once_as_the_papers_do(tiny_llama, smollm2_tokenizer,
                                                                            monkeypatch):
    text = "\n\n".join(["", " = Heading = \n", "", " Some words of an article , repeated . \n"] * 8)
    seen = []
    monkeypatch.setattr(data, "wikitext2_eval_text", lambda split="test": seen.append(split) or text)
    res = wikitext2_perplexity(tiny_llama, smollm2_tokenizer, seq_len=16, split="validation")
    ids = smollm2_tokenizer(text, return_tensors="pt")["input_ids"]
    assert seen == ["validation"]
    assert res == perplexity(tiny_llama, ids, 16)


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_wikitext2_dense_ppl_is_36_6_and_magnitude_2_4_is_far_worse(smollm2, smollm2_tokenizer):
    """Dense, first 16 windows of 512 tokens: 36.634 (the issue: 36.6).

    One-shot magnitude 2:4 measured here: 1833.7 on window 1 (the issue's 1828
    matches one window), 2616.9 on 4, 3197.8 on 16. The sparse check scores 4
    windows to stay inside the CI budget; any of them is > 500.
    """
    dense = wikitext2_perplexity(smollm2, smollm2_tokenizer, seq_len=512, max_windows=16)
    print(f"\nSmolLM2-135M WikiText-2 test, 16x512: dense ppl {dense.ppl:.3f}")
    assert isinstance(dense, PerplexityResult) and dense.windows == 16 and dense.tokens == 16 * 511
    assert dense.ppl == pytest.approx(36.6, abs=1.5)

    sparse = load_model("embedded:smollm2-135m")  # a fresh copy: the session model stays dense
    sparsify(sparse)
    for _, layer in sparse_layers(sparse):
        layer.set_mask(nm_mask(magnitude_score(layer.weight), 2, 4))
    pruned = wikitext2_perplexity(sparse, smollm2_tokenizer, seq_len=512, max_windows=4)
    print(f"SmolLM2-135M WikiText-2 test, 4x512: one-shot magnitude 2:4 ppl {pruned.ppl:.1f}")
    assert math.isfinite(pruned.ppl) and pruned.ppl > 500


def test_per_window_losses_and_the_whole_stream_by_default(tiny_llama):
    """``max_windows=None`` scores every full window; the per-window losses average to nll_mean,
    match the hand computation, and give a bootstrap interval around the perplexity."""
    ids = torch.randint(0, tiny_llama.config.vocab_size, (5 * 16 + 7,), generator=torch.Generator().manual_seed(3))
    r = perplexity(tiny_llama, ids, seq_len=16, batch_size=2)
    assert r.windows == 5 and len(r.window_nll) == 5  # the 7-token tail is dropped
    assert r.window_nll == pytest.approx(hand_nll_per_window(tiny_llama, ids, 16, 5), rel=1e-5)
    assert sum(r.window_nll) / 5 == pytest.approx(r.nll_mean, rel=1e-6)
    lo, hi = r.interval
    assert lo <= r.ppl <= hi and r.as_dict()["ppl_ci95"] == [lo, hi]
    assert perplexity(tiny_llama, ids, seq_len=16, max_windows=2).window_nll == pytest.approx(r.window_nll[:2],
                                                                                              rel=1e-5)
