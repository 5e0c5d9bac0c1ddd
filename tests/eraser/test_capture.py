"""capture(): batched, padded capture equals one prompt at a time and the hidden states by hand."""

import pytest
import torch

from lcdd_kernels.eraser.capture import capture
from lcdd_kernels.eraser.layout import build_rows
from lcdd_kernels.models.tiny import tiny_model

LENGTHS = (3, 11, 1, 7)


def _prompts(vocab, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def _channels(model):
    d = model.config.hidden_size
    # layer 1 is the last layer: its output is captured before the final norm
    return {0: torch.tensor([0, 5, d - 1, 17]), 1: torch.tensor([d - 2, 3])}


def _one_at_a_time(model, prompts, channels):
    """Each prompt alone (no padding, no mask), a plain hook reading the whole layer output."""
    layers = model.model.layers
    out = {layer: [] for layer in channels}
    for p in prompts:
        seen = {}
        hooks = [layers[layer].register_forward_hook(
            lambda m, a, o, layer=layer: seen.__setitem__(layer, o[0] if isinstance(o, tuple) else o))
            for layer in channels]
        model(input_ids=p[None])
        for h in hooks:
            h.remove()
        for layer, ch in channels.items():
            out[layer].append(seen[layer][0, -1, ch])
    return {layer: torch.stack(v) for layer, v in out.items()}


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_batched_capture_matches_single_and_hidden_states(family, padding):
    model = tiny_model(family, dtype=torch.float64).eval()
    prompts = _prompts(model.config.vocab_size)
    channels = _channels(model)
    rows = build_rows(model.get_input_embeddings(), prompts, None, padding)
    with torch.no_grad():
        ref = _one_at_a_time(model, prompts, channels)
        with capture(model, channels) as cap:
            out = model(**rows.model_kwargs(), output_hidden_states=True)
            got = {k: v.clone() for k, v in cap.activations.items()}
    last = rows.starts + rows.lengths - 1
    assert torch.equal(cap.positions, last)
    for layer, ch in channels.items():
        torch.testing.assert_close(got[layer], ref[layer], rtol=0, atol=1e-12)
    # output_hidden_states[l + 1] is layer l's output for every layer but the last (normed there)
    hs = out.hidden_states[1]
    by_hand = torch.stack([hs[b, last[b], channels[0]] for b in range(len(prompts))])
    torch.testing.assert_close(got[0], by_hand, rtol=0, atol=0)


def test_capture_input_ids_with_tokenizer_padding_and_explicit_positions():
    model = tiny_model("llama", dtype=torch.float64).eval()
    prompts = _prompts(model.config.vocab_size)
    channels = {1: torch.arange(0, 48, 5)}
    n = max(LENGTHS)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding as a tokenizer with padding_side="left" does
        ids[b, n - p.numel():], mask[b, n - p.numel():] = p, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = _one_at_a_time(model, prompts, channels)
        with capture(model, channels) as cap:
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        torch.testing.assert_close(cap.activations[1], ref[1], rtol=0, atol=1e-12)
        first = torch.tensor([n - p.numel() for p in prompts])
        with capture(model, channels, position=first) as cap:
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        firsts = _one_at_a_time(model, [p[:1] for p in prompts], channels)
        torch.testing.assert_close(cap.activations[1], firsts[1], rtol=0, atol=1e-12)


def test_buffers_are_reused_and_grad_capture_is_differentiable():
    model = tiny_model("qwen3").eval()
    prompts = _prompts(model.config.vocab_size)
    emb = model.get_input_embeddings()
    channels = {0: [1, 2, 3]}
    with capture(model, channels) as cap:
        model(**build_rows(emb, prompts, None).model_kwargs())
        buf = cap.activations[0]
        model(**build_rows(emb, prompts[::-1], None).model_kwargs())
        assert cap.activations[0].data_ptr() == buf.data_ptr() and not buf.requires_grad
    trigger = torch.randn(2, model.config.hidden_size, requires_grad=True)
    with capture(model, channels, grad=True) as cap:
        model(**build_rows(emb, prompts, trigger).model_kwargs())
        a = cap.activations[0]
    (g,) = torch.autograd.grad(a.sum(), trigger)
    assert a.shape == (len(prompts), 3) and g.abs().sum() > 0
    # hooks are gone after the block
    assert not any(layer._forward_hooks for layer in model.model.layers)


def test_stop_after_last_skips_the_rest():
    model = tiny_model("llama").eval()
    emb = model.get_input_embeddings()
    rows = build_rows(emb, _prompts(model.config.vocab_size), None)
    ran = []
    h = model.model.layers[1].register_forward_hook(lambda *a: ran.append(1))
    with torch.no_grad(), capture(model, {0: [4]}, stop_after_last=True) as cap:
        assert cap.forward(**rows.model_kwargs()) is None
    h.remove()
    assert ran == [] and cap.activations[0].shape == (len(LENGTHS), 1)


@pytest.mark.parametrize("channels, match", [
    ({0: [0, 48]}, r"out of range \[0, 48\)"),
    ({0: [-1]}, r"out of range"),
    ({2: [0]}, r"layer 2 does not exist; this model has 2 decoder layers"),
    ({0: [0.5]}, r"integer indices"),
    ([0, 1], r"must map layer index"),
])
def test_bad_channels(channels, match):
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        with capture(model, channels):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton gather kernel)")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_capture_on_cuda(family, padding):
    model = tiny_model(family).cuda().eval()
    prompts = [p.cuda() for p in _prompts(model.config.vocab_size)]
    channels = {k: v.cuda() for k, v in _channels(model).items()}
    rows = build_rows(model.get_input_embeddings(), prompts, None, padding)
    with torch.no_grad():
        ref = _one_at_a_time(model, prompts, channels)
        with capture(model, channels) as cap:
            model(**rows.model_kwargs())
    for layer in channels:
        torch.testing.assert_close(cap.activations[layer], ref[layer], rtol=1e-4, atol=1e-5)



def test_trigger_layout_is_exact_and_its_gradient_right():
    """build_rows puts [pad..., T, x_b] in each row exactly, and ∂/∂T is the sum of each row's
    gradient at the trigger's columns."""
    emb = torch.nn.Embedding(50, 32)
    prompts = _prompts(50, lengths=(30, 5, 17, 40))
    g = torch.Generator().manual_seed(3)
    trigger = torch.randn(8, 32, generator=g, requires_grad=True)
    weights = torch.randn(4, 48, 32, generator=g)
    rows = build_rows(emb, prompts, trigger)
    (grad,) = torch.autograd.grad((rows.inputs_embeds * weights).sum(), trigger)
    starts = [48 - 8 - p.numel() for p in prompts]
    expect = sum(weights[b, s:s + 8].double() for b, s in enumerate(starts))
    torch.testing.assert_close(grad.double(), expect, rtol=1e-6, atol=1e-5)
    for b, (p, s) in enumerate(zip(prompts, starts)):
        assert torch.equal(rows.inputs_embeds[b, s:s + 8], trigger.detach())
        assert torch.equal(rows.inputs_embeds[b, s + 8:], emb(p).detach())
        assert rows.attention_mask[b, :s].sum() == 0 and rows.attention_mask[b, s:].all()
