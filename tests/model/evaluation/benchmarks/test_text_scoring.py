"""Shared-prefix choice scoring gives what one full forward pass per (context, continuation) gives, as lm-eval
computes it; and the tokenisation of the pair is lm-eval's `_encode_pair`."""

from __future__ import annotations

import pytest
import torch

from model.evaluation.benchmarks.choice_scoring import Encoded, encode_pair, score_requests, shared_prefix_length
from model.evaluation.benchmarks.generative import greedy_generate
from model.lm.transformer import Transformer
from schemas.model_config import ModelConfig


def reference_scores(model: Transformer, request: Encoded, excluded: torch.Tensor | None = None) -> tuple[float, bool]:
    """lm-eval's `_loglikelihood_tokens` for one request: the whole sequence (but its last token) in one forward."""
    tokens = list(request.tokens)[-(model.config.max_seq_len + 1) :]
    n_cont = min(request.n_continuation, len(tokens) - 1)
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0].float()
    if excluded is not None:
        logits[:, excluded] = float("-inf")
    lp = torch.log_softmax(logits, -1)[-n_cont:]
    targets = torch.tensor(tokens[-n_cont:])
    return float(lp.gather(1, targets[:, None]).sum()), bool((lp.argmax(-1) == targets).all())


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def model(request: pytest.FixtureRequest) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny").model_copy(update={"n_kv_heads": request.param, "max_seq_len": 64})
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the init's, so the choices' scores differ clearly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def random_groups(vocab: int, seed: int) -> list[list[Encoded]]:
    """Questions of 1-5 choices: a shared context of 1-30 tokens, continuations of 1-6, some sharing tokens."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(4, vocab, (n,), generator=g).tolist()

    groups = []
    for _ in range(9):
        context = [1, *ids(int(torch.randint(0, 30, (1,), generator=g)))]
        common = ids(int(torch.randint(0, 3, (1,), generator=g)))  # continuations that start alike
        group = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            cont = common + ids(int(torch.randint(1, 5, (1,), generator=g)))
            group.append(Encoded(tuple(context + cont), len(cont)))
        groups.append(group)
    # Partial scoring (WinoGrande): different contexts, one shared continuation.
    groups.append([Encoded((1, 9, 10, 11, 40, 41), 2), Encoded((1, 9, 10, 12, 13, 40, 41), 2)])
    return groups


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_prefix_scores_equal_one_forward_per_request(model: Transformer, batch_size: int) -> None:
    groups = random_groups(model.config.vocab_size, seed=batch_size)
    excluded = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    excluded[4:20] = True  # "image codes": no probability mass, as transformers' Chameleon masks them
    got = score_requests(model, groups, excluded, batch_size=batch_size)
    assert [len(g) for g in got] == [len(g) for g in groups]
    for group, scores in zip(groups, got, strict=True):
        for request, (ll, greedy) in zip(group, scores, strict=True):
            want_ll, want_greedy = reference_scores(model, request, excluded)
            assert ll == pytest.approx(want_ll, abs=1e-4)
            assert greedy == want_greedy


def test_greedy_flag_is_true_when_the_continuation_is_the_argmax(model: Transformer) -> None:
    context = [1, 30, 31, 32]
    with torch.no_grad():
        best = int(model(torch.tensor([context]))[0, -1].argmax())
    scores = score_requests(model, [[Encoded((*context, best), 1), Encoded((*context, best + 1), 1)]])[0]
    assert scores[0][1] is True and scores[1][1] is False
    assert scores[0][0] > scores[1][0]


def test_requests_longer_than_the_context_are_left_truncated_as_lm_eval_does(model: Transformer) -> None:
    long = Encoded(tuple([1, *range(20, 100)]), 3)  # 81 tokens > max_seq_len + 1 = 65
    short = Encoded((1, 20, 21, 22), 1)
    got = score_requests(model, [[long, Encoded(tuple([1, *range(20, 98), 5, 6]), 2)], [short]])
    assert got[0][0][0] == pytest.approx(reference_scores(model, long)[0], abs=1e-4)
    assert got[1][0][0] == pytest.approx(reference_scores(model, short)[0], abs=1e-4)


def test_shared_prefix_stops_before_the_first_scored_token() -> None:
    a, b = Encoded((1, 5, 6, 7, 8), 2), Encoded((1, 5, 6, 7, 9), 2)
    assert shared_prefix_length([a, b]) == 3  # tokens 7 are shared but scored: they must be predicted per row
    assert shared_prefix_length([Encoded((1, 5, 6), 1)]) == 2
    assert shared_prefix_length([Encoded((1, 5), 1), Encoded((1, 6), 1)]) == 1


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding() -> None:
    seen = []

    def encode(text: str) -> list[int]:  # one id per word, the space belonging to the word after it
        seen.append(text)
        return [100 + len(w) for w in text.replace(" ", " _").split(" ") if w]

    pair = encode_pair(encode, 1, "Question: why?\nAnswer: ", "because")
    assert seen == ["Question: why?\nAnswer: because", "Question: why?\nAnswer:"]
    assert pair.tokens[0] == 1 and pair.n_continuation == 1 and pair.n_context == len(pair.tokens) - 1
    with pytest.raises(ValueError, match="empty context"):
        encode_pair(encode, 1, "", "x")
    with pytest.raises(ValueError, match="adds no token"):
        encode_pair(encode, 1, "a", "")


def test_greedy_generation_follows_the_argmax_and_stops(model: Transformer) -> None:
    prompt = [1, 30, 31]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    out = greedy_generate(model, prompt, lambda ids: " ".join(map(str, ids)), max_new_tokens=5)
    assert out == " ".join(map(str, tokens[3:]))
    # An `until` string ends generation and is cut off; a stop id ends it unprinted.
    stop_text = str(tokens[4])
    cut = greedy_generate(model, prompt, lambda ids: " ".join(map(str, ids)), until=[stop_text], max_new_tokens=9)
    assert cut == " ".join(map(str, tokens[3:])).split(stop_text)[0]
    assert (
        greedy_generate(model, prompt, lambda ids: " ".join(map(str, ids)), stop_ids=[tokens[3]], max_new_tokens=9)
        == ""
    )
