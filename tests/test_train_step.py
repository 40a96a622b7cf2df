"""The model-level training step: loss and every gradient of MMfreeLMForCausalLM against
mmfree_ext.reference, the labels API, and compile fullgraph of the loss function.

STYLE.md's rule, applied to whole-model quantities: our fp32 error against the reference run
in float64 is at most twice the fp32 reference's own error, plus a floor. The floor is there
because the model is discontinuous (SPEC section 2: an ulp-level difference in an fp32
statistic can move an int8 code by one, and the float64 run's codes follow its own inputs);
it is measured as a relative Frobenius distance, like the logits tests of test_models.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from mmfree_ext import reference as ref
from mmfree_ext.models import MMfreeLMConfig, MMfreeLMForCausalLM
from mmfree_ext.train import lm_loss_sum

TINY = {"vocab_size": 300, "hidden_size": 96, "num_hidden_layers": 3, "intermediate_size": 200}
# Relative Frobenius floor for gradients. On CPU the same fp32 statistics give the same codes
# (measured max 8.5e-7 at this size); CUDA sums in other orders, where an int8 code moved by
# one changes a few entries (~1e-3).
GRAD_FLOOR = {"cpu": 1e-4, "cuda": 2e-3}


def lm_loss(model: MMfreeLMForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ``batch [B, T+1]`` through the fused lm_head + cross entropy."""
    return model(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _reference(seed: int = 1) -> ref.ReferenceMMfreeLM:
    model = ref.ReferenceMMfreeLM(TINY).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        model.model.lower_bounds.copy_(torch.randn(model.model.lower_bounds.shape, generator=gen))
    return model


def _ours(reference: ref.ReferenceMMfreeLM, device: str) -> MMfreeLMForCausalLM:
    model = MMfreeLMForCausalLM(MMfreeLMConfig.from_dict({"model_type": "hgrn_bit", **TINY}), init_seed=None)
    model.load_state_dict(reference.state_dict())
    return model.to(device)


def _reference_loss_and_grads(model: ref.ReferenceMMfreeLM, batch: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    logits, _ = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(logits.dtype), batch[:, 1:].reshape(-1))
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
def test_model_loss_and_every_gradient_match_reference(device):
    reference = _reference()
    batch = torch.randint(0, TINY["vocab_size"], (2, 17))
    base_loss, base = _reference_loss_and_grads(reference, batch)
    truth_model = _reference()
    truth_model.load_state_dict(reference.state_dict())
    truth_loss, truth = _reference_loss_and_grads(truth_model.double(), batch)

    model = _ours(reference, device)
    loss = lm_loss(model, batch.to(device))
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(float(loss) - truth_loss) <= 2 * abs(base_loss - truth_loss) + 1e-4 * truth_loss
    params = dict(model.named_parameters())
    assert params.keys() == truth.keys()
    for name, t in truth.items():
        g = params[name].grad
        assert g is not None and g.dtype == torch.float32, name
        err, base_err = _rel(g.cpu(), t), _rel(base[name], t)
        assert err <= 2 * base_err + GRAD_FLOOR[device], f"{name}: rel error {err:.3g} vs reference {base_err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_labels_follow_the_transformers_convention(device):
    model = _ours(_reference(), device)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), device=device)
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    assert out.logits is None and out.loss is not None and out.state.shape == (3, 2, TINY["hidden_size"])
    with torch.no_grad():
        logits = model(ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=1e-5)
    # labels aligned with the positions already: the same loss from the same targets
    aligned = model(ids[:, :-1], labels=labels[:, 1:], shift_labels=False).loss
    torch.testing.assert_close(aligned.detach(), want, rtol=1e-5, atol=1e-5)
    # a plain forward is unchanged: a (logits, state) 2-tuple with loss None
    plain = model(ids)
    logits2, state = plain
    assert plain.loss is None and logits2.shape == (2, 9, TINY["vocab_size"]) and state.shape[0] == 3
    # packed models compute the same loss from their logits
    packed = _ours(_reference(), device).pack()
    with torch.no_grad():
        packed_out = packed(ids, labels=labels)
    assert packed_out.logits is not None
    assert abs(float(packed_out.loss) - float(want)) < 2e-2


def test_bad_labels_raise():
    model = _ours(_reference(), "cpu")
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_compile_fullgraph_loss_matches_eager():
    torch._dynamo.reset()
    reference = _reference()
    batch = torch.randint(0, TINY["vocab_size"], (2, 9))
    eager_model, compiled_model = _ours(reference, "cpu"), _ours(reference, "cpu")
    eager = lm_loss(eager_model, batch)
    eager.backward()
    step = torch.compile(lambda b: lm_loss(compiled_model, b), fullgraph=True, backend="aot_eager")
    loss = step(batch)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(compiled_model.named_parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_step_error_is_within_the_bf16_reference_error(device):
    """bf16 model vs the fp32 reference: within a small multiple of the bf16 reference's own
    distance (per parameter gradient, relative Frobenius)."""
    reference = _reference()
    batch = torch.randint(0, TINY["vocab_size"], (2, 17))
    truth_loss, truth = _reference_loss_and_grads(reference, batch)
    ref16 = _reference()
    ref16.load_state_dict(reference.state_dict())
    base_loss, base = _reference_loss_and_grads(ref16.to(torch.bfloat16), batch)
    model = _ours(reference, device).to(torch.bfloat16)
    loss = lm_loss(model, batch.to(device))
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(float(loss) - truth_loss) <= 2 * abs(base_loss - truth_loss) + 1e-3 * truth_loss
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name
        err, base_err = _rel(p.grad.cpu(), truth[name]), _rel(base[name], truth[name])
        assert err <= 2 * base_err + 2e-2, f"{name}: rel error {err:.3g} vs bf16 reference {base_err:.3g}"


def test_trainer_loss_sum_uses_the_fused_loss_and_matches_the_materialized_sum():
    model = _ours(_reference(), "cpu")
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    labels = torch.randint(0, TINY["vocab_size"], (2, 9))
    labels[0, :4] = -100
    got = lm_loss_sum(model, ids, labels)
    with torch.no_grad():
        logits = model(ids).logits
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-4)
    none = lm_loss_sum(model, ids, torch.full_like(labels, -100))
    assert float(none) == 0.0
    none.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
