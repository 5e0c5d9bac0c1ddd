"""Generation and the scores of SPEC §6 against direct, one-prompt-at-a-time computation."""

import pytest
import torch

from lcdd_kernels.eraser.generate import generate_with_trigger
from lcdd_kernels.eraser.metrics import choice_accuracy, choice_scores, fixed_response_rate, kl_benchmark
from lcdd_kernels.models.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "a", "what is the answer?", "xyz 12"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    return (tiny_model("qwen3", seed=0, dtype=torch.float64).eval(),
            tiny_model("qwen3", seed=1, dtype=torch.float64).eval())


def _embeds(model, ids, trigger):
    e = model.get_input_embeddings()(torch.as_tensor(ids))
    return e if trigger is None else torch.cat([trigger.to(e.dtype), e])


@torch.no_grad()
def test_batched_greedy_equals_one_at_a_time(models, tok):
    model = models[0]
    trigger = torch.randn(3, model.config.hidden_size, dtype=torch.float64)
    got = generate_with_trigger(model, tok, PROMPTS, trigger, max_new_tokens=10, batch_size=3, return_ids=True)
    for p, r in zip(PROMPTS, got):
        e, ref = _embeds(model, tok(p)["input_ids"], trigger), []
        for _ in range(10):  # greedy by hand, no cache, no padding
            nxt = int(model(inputs_embeds=e[None]).logits[0, -1].argmax())
            ref.append(nxt)
            if nxt == tok.eos_token_id:
                break
            e = torch.cat([e, _embeds(model, [nxt], None)])
        assert r == ref
    texts = generate_with_trigger(model, tok, PROMPTS, trigger, max_new_tokens=10, batch_size=3)
    assert texts == tok.batch_decode(got, skip_special_tokens=True)


def test_fixed_response_rate():
    responses = ["I don't know.", "i DO NOT know what you mean " + "word " * 40, "Paris.",
                 "I\u2019m not sure, sorry.", "I am not sure"]
    r = fixed_response_rate(responses)
    assert r == {"strict": 3 / 5, "loose": 4 / 5, "n": 5}
    with pytest.raises(ValueError, match="non-empty list"):
        fixed_response_rate([])


@torch.no_grad()
def _direct_logprobs(model, prefix, cont, trigger=None):
    """log p(. | trigger, prefix, cont[:j]) for each j: (len(cont), V), full logits, one sequence."""
    e = _embeds(model, list(prefix) + list(cont), trigger)
    logp = model(inputs_embeds=e[None]).logits[0].log_softmax(-1)
    start = (0 if trigger is None else trigger.shape[0]) + len(prefix) - 1
    return logp[start:start + len(cont)]


def test_kl_benchmark_against_direct(models, tok):
    a, b = models
    refs = ["yes", "no way", "", "42 is it"]
    trigger = torch.randn(2, a.config.hidden_size, dtype=torch.float64)
    got = kl_benchmark(a, b, PROMPTS, refs, trigger_b=trigger, tokenizer=tok, batch_size=3)
    total, n = 0.0, 0
    for p, r in zip(PROMPTS, refs):
        cont = tok(r, add_special_tokens=False)["input_ids"]
        if not cont:
            continue
        la = _direct_logprobs(a, tok(p)["input_ids"], cont)
        lb = _direct_logprobs(b, tok(p)["input_ids"], cont, trigger)
        total += float((la.exp() * (la - lb)).sum())
        n += len(cont)
    assert got == pytest.approx(total / n, rel=1e-9)
    assert kl_benchmark(a, a, PROMPTS, refs, tokenizer=tok) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="one reference per prompt"):
        kl_benchmark(a, b, PROMPTS, refs[:2], tokenizer=tok)


@pytest.mark.parametrize("normalize", [False, True])
def test_choice_accuracy_against_direct(models, tok, normalize):
    model = models[0]
    items = [{"prompt": "q: 2+2=", "choices": [" 4", " 5", " four"], "answer": 0},
             {"prompt": "color", "choices": ["red", "b"], "answer": 1},
             {"prompt": "z", "choices": ["aa", "bb", "c", "dd"], "answer": 2}]
    trigger = torch.randn(2, model.config.hidden_size, dtype=torch.float64)
    expected, direct = 0, []
    for it in items:
        p = tok(it["prompt"])["input_ids"]
        scores = []
        for c in it["choices"]:
            ids = tok(c, add_special_tokens=False)["input_ids"]
            lp = _direct_logprobs(model, p, ids, trigger)
            s = lp.gather(-1, torch.tensor(ids)[:, None]).sum()
            scores.append(float(s / len(ids) if normalize else s))
        direct.append(torch.tensor(scores, dtype=torch.float64))
        expected += max(range(len(scores)), key=scores.__getitem__) == it["answer"]
    got = choice_scores(model, items, trigger=trigger, tokenizer=tok, batch_size=4, length_normalize=normalize)
    for g, d in zip(got, direct):
        torch.testing.assert_close(g, d, rtol=1e-10, atol=1e-10)
    acc = choice_accuracy(model, items, trigger=trigger, tokenizer=tok, batch_size=4, length_normalize=normalize)
    assert acc == pytest.approx(expected / len(items))
    with pytest.raises(ValueError, match="answer 3 but 2 choices"):
        choice_accuracy(model, [{"prompt": "a", "choices": ["b", "c"], "answer": 3}], tokenizer=tok)
