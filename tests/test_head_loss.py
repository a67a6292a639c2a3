"""The training loss's frozen head, a slice at a time (adapters/lora.py `batch_loss`): the same loss and
the same gradients as autograd through the whole batch's logits, in float32 and in bfloat16."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from adapters import lora  # noqa: E402


def _whole(head, hidden, labels):
    """The loss as it was computed before: every labelled row's logits at once, autograd through them."""
    target = labels[:, 1:]
    where = target != -100
    logits = head(hidden[:, :-1][where])
    token_loss = torch.nn.functional.cross_entropy(logits.float(), target[where], reduction="none")
    rows = where.nonzero()[:, 0]
    total = torch.zeros(len(labels), dtype=token_loss.dtype).index_add(0, rows, token_loss)
    return (total / where.sum(1).clamp(min=1)).mean()


def _case(dtype):
    gen = torch.Generator().manual_seed(0)
    vocab, width, batch, length = 97, 16, 4, 11
    head = torch.nn.Linear(width, vocab, bias=False).to(dtype).requires_grad_(False)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :4] = -100                 # the prompt carries no loss
    labels[2] = -100                     # a sequence with no labelled token counts 0
    labels[3, 6:] = -100
    net = torch.nn.Linear(width, width).to(dtype)
    inputs = torch.randn(batch, length, width, generator=gen).to(dtype)
    return head, net, inputs, labels


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sliced_head_loss_equals_the_whole_logits_loss_and_its_gradients(monkeypatch, dtype, tolerance):
    monkeypatch.setattr(lora, "HEAD_CHUNK", 5)     # slices that do not divide the 17 labelled rows
    head, net, inputs, labels = _case(dtype)
    expected = _whole(head, net(inputs), labels)
    expected.backward()
    want = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()
    got = lora.batch_loss(torch, head, net(inputs), labels)
    got.backward()
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(expected.item(), rel=tolerance)
    for name, p in net.named_parameters():
        assert torch.allclose(p.grad.float(), want[name].float(), rtol=tolerance, atol=tolerance * 1e-1), name
    per_sequence = lora.sequence_losses(torch, head, net(inputs), labels)
    assert per_sequence.shape == (4,) and per_sequence[2] == 0
    assert per_sequence.mean().item() == pytest.approx(expected.item(), rel=tolerance)


def test_a_head_that_is_not_a_plain_linear_goes_through_autograd_whole():
    head, net, inputs, labels = _case(torch.float32)
    biased = torch.nn.Linear(16, 97, bias=True).requires_grad_(False)
    expected = _whole(biased, net(inputs), labels)
    assert lora.batch_loss(torch, biased, net(inputs), labels).item() == pytest.approx(expected.item(), rel=1e-6)
