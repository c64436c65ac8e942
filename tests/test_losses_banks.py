"""L_VIS / L_TEX and the LGKA update of the VSB against hand-computed values and plain-loop references."""
import math

import pytest
import torch
import torch.nn.functional as F

from lgd.banks import VisualSemanticsBank
from lgd.losses import lgd_loss


def test_lgd_loss_hand_computed():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, l_vis, l_tex = lgd_loss(s, t, tsb=bank, vsb=bank)
    # L_VIS: teacher logits [t.t, t.v1, t.v2] = [1, 1, 0] / 0.01 -> target [1/2, 1/2, ~0];
    # student [1, 1, 0] / 0.2 -> -log p = log(2 + e^-5) for the first two entries.
    expected_vis = math.log(2 + math.exp(-5))
    # L_TEX: target [1, ~0]; student [1, 0] / 0.2 -> -log p = log(1 + e^-5).
    expected_tex = math.log(1 + math.exp(-5))
    assert l_vis.item() == pytest.approx(expected_vis, rel=1e-6)
    assert l_tex.item() == pytest.approx(expected_tex, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * expected_vis + 0.5 * expected_tex, rel=1e-6)


def _reference_loss(s, t, tsb, vsb, ts, tt, alpha):
    """Per-sample loops over the formula in the paper, in float64."""
    s, t, tsb, vsb = (x.double() for x in (s, t, tsb, vsb))
    vis, tex = [], []
    for i in range(s.shape[0]):
        zs = [float(s[i] @ t[i])] + [float(s[i] @ v) for v in vsb]
        zt = [float(t[i] @ t[i])] + [float(t[i] @ v) for v in vsb]
        p = torch.tensor(zt, dtype=torch.float64).div(tt).softmax(0)
        vis.append(-(p * torch.tensor(zs, dtype=torch.float64).div(ts).log_softmax(0)).sum())
        p = (tsb @ t[i]).div(tt).softmax(0)
        tex.append(-(p * (tsb @ s[i]).div(ts).log_softmax(0)).sum())
    l_vis, l_tex = torch.stack(vis).mean(), torch.stack(tex).mean()
    return alpha * l_vis + (1 - alpha) * l_tex, l_vis, l_tex


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_lgd_loss_matches_reference(alpha):
    g = torch.Generator().manual_seed(0)
    s, t = (F.normalize(torch.randn(8, 16, generator=g), dim=1) for _ in range(2))
    tsb, vsb = (F.normalize(torch.randn(12, 16, generator=g), dim=1) for _ in range(2))
    got = lgd_loss(s, t, tsb, vsb, student_temp=0.2, teacher_temp=0.05, alpha=alpha)
    want = _reference_loss(s, t, tsb, vsb, 0.2, 0.05, alpha)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)


def test_lgd_loss_gradient_reaches_student_only():
    s = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    t = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    bank = F.normalize(torch.randn(5, 8), dim=1)
    loss, _, _ = lgd_loss(s, t, bank, bank)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_shared_t_tsb_gives_same_loss():
    s, t = (F.normalize(torch.randn(6, 8), dim=1) for _ in range(2))
    bank = F.normalize(torch.randn(5, 8), dim=1)
    assert torch.equal(lgd_loss(s, t, bank, bank)[0], lgd_loss(s, t, bank, bank, t_tsb=t @ bank.T)[0])


def _loop_update(bank, seen, t, tsb, m):
    """Straightforward per-class loop over the LGKA rule."""
    bank, seen = bank.clone(), seen.clone()
    labels = (t @ tsb.T).argmax(1)
    for c in range(bank.shape[0]):
        members = t[labels == c]
        if len(members) == 0:
            continue
        z = members.mean(0)
        bank[c] = m * bank[c] + (1 - m) * z if seen[c] else z
        seen[c] = True
    return bank, seen


def test_vsb_hand_computed():
    vsb = VisualSemanticsBank(3, 2, momentum=0.9)
    init = vsb.bank.clone()
    tsb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # -> classes 0, 1, 1
    vsb.update(t, tsb)
    assert torch.allclose(vsb.bank[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(vsb.bank[1], torch.tensor([0.3, 0.9]))  # mean, not renormalised
    assert torch.equal(vsb.bank[2], init[2])  # never hit: keeps its random init
    assert vsb.seen.tolist() == [True, True, False]
    vsb.update(torch.tensor([[0.0, 1.0]]), tsb)
    assert torch.allclose(vsb.bank[1], 0.9 * torch.tensor([0.3, 0.9]) + 0.1 * torch.tensor([0.0, 1.0]))
    assert torch.allclose(vsb.bank[0], torch.tensor([1.0, 0.0]))


def test_vsb_update_matches_loop_reference_c1000():
    torch.manual_seed(0)
    C, D, B, m = 1000, 64, 256, 0.99
    vsb = VisualSemanticsBank(C, D, momentum=m)
    tsb = F.normalize(torch.randn(C, D), dim=1)
    bank, seen = vsb.bank.clone(), vsb.seen.clone()
    for step in range(4):
        # Concentrate on a few hundred classes so that both "first hit" and "seen" branches occur.
        centres = tsb[torch.randint(0, 300, (B,))]
        t = F.normalize(centres + 0.3 * torch.randn(B, D), dim=1)
        bank, seen = _loop_update(bank, seen, t, tsb, m)
        vsb.update(t, tsb)
        assert torch.equal(vsb.seen, seen)
        torch.testing.assert_close(vsb.bank, bank, rtol=0, atol=1e-6)
    assert 0 < int(seen.sum()) < C


def test_vsb_update_with_precomputed_labels_and_half_input():
    vsb_a, vsb_b = VisualSemanticsBank(10, 8), VisualSemanticsBank(10, 8)
    vsb_b.load_state_dict(vsb_a.state_dict())
    tsb = F.normalize(torch.randn(10, 8), dim=1)
    t = F.normalize(torch.randn(32, 8), dim=1)
    vsb_a.update(t, tsb)
    vsb_b.update(t.half(), labels=vsb_b.assign(t, tsb))
    torch.testing.assert_close(vsb_a.bank, vsb_b.bank, rtol=0, atol=2e-3)
    assert vsb_b.bank.dtype == torch.float32


def test_vsb_rejects_bad_momentum_and_missing_assignment():
    with pytest.raises(ValueError, match="momentum"):
        VisualSemanticsBank(3, 2, momentum=1.0)
    with pytest.raises(ValueError, match="tsb or labels"):
        VisualSemanticsBank(3, 2).update(torch.randn(2, 2))
