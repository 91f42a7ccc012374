"""Chunked completion log-probs equal the full-logits formula, values and gradients."""

import copy

import torch

from spr_lightning.logprobs import IGNORE_INDEX, completion_logps, completion_logps_reference


def make_case(seed=0, batch=3, length=9, hidden=8, vocab=50):
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, length, hidden, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=True)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :5] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a row with no completion token
    return hidden_states, head, labels


def test_chunked_equals_full_logits_values_and_gradients():
    hidden_states, head, labels = make_case()
    logps, counts = completion_logps(hidden_states, head, labels, chunk_size=3)
    (grad_chunked,) = torch.autograd.grad(logps.sum(), hidden_states)
    ref, ref_counts = completion_logps_reference(head(hidden_states), labels)
    (grad_ref,) = torch.autograd.grad(ref.sum(), hidden_states)
    assert torch.allclose(logps, ref, atol=1e-5)
    assert torch.equal(counts, ref_counts) and counts.tolist() == [4.0, 7.0, 0.0]
    assert logps[2] == 0.0
    assert torch.allclose(grad_chunked, grad_ref, atol=1e-5)


def test_no_grad_path_and_bf16_hidden_states_compute_in_fp32():
    hidden_states, head, labels = make_case(seed=1)
    with torch.no_grad():
        logps, _ = completion_logps(hidden_states.bfloat16(), copy.deepcopy(head).bfloat16(), labels, chunk_size=4)
    assert logps.dtype == torch.float32
    ref, _ = completion_logps_reference(head(hidden_states).detach(), labels)
    assert torch.allclose(logps, ref, atol=0.5)  # bf16 inputs: loose, but same numbers to ~1e-2 relative
    assert (logps[:2] < 0).all()
