"""KD losses against hand-computed values (plain-math softmax/KL, see the numbers below)."""

import math
import re

import pytest
import torch

from kdist import KdistError
from kdist.config import KDConfig, StageConfig
from kdist.losses import KD_LOSSES, dist, dkd, get_kd_loss, hinton, standardize
from kdist.objectives import Distillation

# Two samples, 3 classes, T = 2, alpha = 0.7. Computed by hand with math.exp/math.log:
#   row 1: KL(softmax(zt/2) || softmax(zs/2)) = 0.2205144151612286, CE(zs, y=0) = 1.4076059644443804
#   row 2: KL = 0.2681956364930115, CE(zs, y=2) = 1.1041306053367284
STUDENT = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 0.0]])
TEACHER = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
LABELS = torch.tensor([0, 2])


def training_loss(
    student, teacher, labels, method="hinton", temperature=4.0, alpha=0.9, standardize_logits=False, class_weights=None
):
    """The loss a distillation step computes (objectives.Distillation.loss) for these logits."""
    kd = KDConfig(method=method, temperature=temperature, alpha=alpha, standardize=standardize_logits)
    cache = torch.zeros(len(labels), 8, teacher.shape[1])  # unused: the teacher's logits are given
    return Distillation(StageConfig(), kd, teacher_logits_cache=cache, class_weights=class_weights).loss(
        student, labels, teacher
    )[0]


def test_hinton_matches_hand_computed_value():
    expected_kd = 4 * (0.2205144151612286 + 0.2681956364930115) / 2  # T^2 * batch-mean KL
    assert hinton(STUDENT, TEACHER, LABELS, 2.0).item() == pytest.approx(expected_kd, rel=1e-6)


def test_distillation_loss_combines_kd_and_ce():
    expected = (
        0.7 * 4 * (0.2205144151612286 + 0.2681956364930115) / 2 + 0.3 * (1.4076059644443804 + 1.1041306053367284) / 2
    )
    loss = training_loss(STUDENT, TEACHER, LABELS, "hinton", temperature=2.0, alpha=0.7)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy():
    loss = training_loss(STUDENT, TEACHER, LABELS, "hinton", temperature=3.0, alpha=0.0)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(STUDENT, LABELS).item())


def test_t_squared_keeps_gradient_scale():
    """d(T^2 KL)/dz_s = T (p_s - p_t) / batch; for large T that tends to (z_s - z_t)/(C * batch) independent of T."""
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 7) * 0.1, torch.randn(4, 7) * 0.1
    norms = []
    for temperature in (4.0, 8.0, 16.0):
        student = zs.clone().requires_grad_(True)
        hinton(student, zt, None, temperature).backward()
        expected = temperature * (torch.softmax(zs / temperature, 1) - torch.softmax(zt / temperature, 1)) / 4
        torch.testing.assert_close(student.grad, expected)
        norms.append(student.grad.norm().item())
    assert max(norms) / min(norms) < 1.05  # without T^2 the gradient would shrink 16-fold from T=4 to T=16


def test_hinton_is_zero_when_student_equals_teacher():
    assert hinton(TEACHER, TEACHER, LABELS, 4.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_every_registered_loss_is_finite_and_differentiable(name):
    student = STUDENT.clone().requires_grad_(True)
    loss = training_loss(student, TEACHER, LABELS, name, temperature=4.0, alpha=0.9)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # documented: the paper (authors and year) and the formula
    doc = KD_LOSSES[name].__doc__ or ""
    assert re.search(r"\(\w[^()]*(et al\.|&)[^()]*\b(19|20)\d\d\)", doc) and "=" in doc, doc


def test_unknown_method_is_a_clear_error():
    with pytest.raises(KdistError, match="unknown KD method 'nope'"):
        get_kd_loss("nope")


def test_hinton_is_t_squared_times_the_plain_math_kl_per_sample():
    """The hand values above, recomputed with plain math for each row, against kdist's loss on that row alone."""

    def softmax(z, t):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    for row in range(2):
        ps, pt = softmax(STUDENT[row].tolist(), 2), softmax(TEACHER[row].tolist(), 2)
        kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        got = hinton(STUDENT[row : row + 1], TEACHER[row : row + 1], LABELS[row : row + 1], 2.0).item()
        assert got == pytest.approx(4 * kl, rel=1e-6)


def test_dkd_matches_hand_computed_value():
    # Per sample (T = 2), by hand: TCKD 0.08584589337649598 / 0.24699010663522997,
    # NCKD 0.27287370014089807 / 0.06872382555495468; kd = T^2 * mean(TCKD + 8 NCKD).
    assert dkd(STUDENT, TEACHER, LABELS, 2.0).item() == pytest.approx(6.131232411157096, rel=1e-5)
    tckd_only = 4 * (0.08584589337649598 + 0.24699010663522997) / 2
    assert dkd(STUDENT, TEACHER, LABELS, 2.0, beta=0.0).item() == pytest.approx(tckd_only, rel=1e-5)


def test_dist_matches_hand_computed_value():
    # inter = mean over samples of 1 - pearson = 1.2035683218839401; intra (2 samples per class,
    # so each correlation is +-1) = 0.6666666666666666; kd = T^2 * (inter + intra).
    assert dist(STUDENT, TEACHER, LABELS, 2.0).item() == pytest.approx(7.480939954202427, rel=1e-5)


def test_logit_standardisation():
    z = standardize(STUDENT)
    torch.testing.assert_close(z.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(2))
    # Hinton on standardised logits (T = 2), by hand: 0.7125075419162514
    loss = training_loss(STUDENT, TEACHER, LABELS, "hinton", 2.0, alpha=1.0, standardize_logits=True)
    assert loss.item() == pytest.approx(0.7125075419162514, rel=1e-5)
    # invariant to shifting and scaling the teacher's logits
    again = training_loss(STUDENT, 3 * TEACHER + 5, LABELS, "hinton", 2.0, alpha=1.0, standardize_logits=True)
    assert again.item() == pytest.approx(loss.item(), rel=1e-5)


def test_class_weights_weight_only_the_label_term():
    # logits [2, 0, ..., 0]: -log p(class 0) = ln(e^2 + 6) - 2 = 0.594440, -log p(class 1) = 2.594440
    logits = torch.tensor([[2.0, 0, 0, 0, 0, 0, 0]] * 2)
    labels = torch.tensor([0, 1])
    weights = torch.tensor([1.0, 3.0, 1, 1, 1, 1, 1])
    plain = training_loss(logits, logits, labels, alpha=0.0)
    weighted = training_loss(logits, logits, labels, alpha=0.0, class_weights=weights)
    assert abs(float(plain) - 1.594440) < 1e-5 and abs(float(weighted) - (0.594440 + 3 * 2.594440) / 4) < 1e-5
    # the KD term is untouched by class weights
    teacher = torch.tensor([[0.5, 1.0, 0, 0, 0, 0, 0]] * 2)
    assert float(training_loss(logits, teacher, labels, alpha=1.0, class_weights=weights)) == float(
        training_loss(logits, teacher, labels, alpha=1.0)
    )


def test_supervised_objective_uses_the_class_weights():
    from kdist.config import StageConfig
    from kdist.objectives import Supervised

    logits, labels = torch.randn(6, 7), torch.tensor([0, 1, 2, 0, 0, 3])
    weights = torch.linspace(0.5, 2.0, 7)
    loss, parts = Supervised(StageConfig(), class_weights=weights).loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=weights)
    torch.testing.assert_close(loss, expected)
    assert parts == {}


def test_distillation_applies_the_stages_label_smoothing():
    """distill.label_smoothing shapes the label term of the distillation loss."""
    from kdist.config import KDConfig, StageConfig
    from kdist.objectives import Distillation

    torch.manual_seed(0)
    logits, targets, labels = torch.randn(8, 7), torch.randn(8, 7), torch.randint(0, 7, (8,))
    kd = KDConfig(method="hinton", alpha=0.5)
    plain = Distillation(StageConfig(), kd, teacher_logits_cache=torch.zeros(8, 8, 7))
    smooth = Distillation(StageConfig(label_smoothing=0.2), kd, teacher_logits_cache=torch.zeros(8, 8, 7))
    (_, plain_parts), (_, smooth_parts) = plain.loss(logits, labels, targets), smooth.loss(logits, labels, targets)
    torch.testing.assert_close(plain_parts["kd"], smooth_parts["kd"])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(smooth_parts["ce"], expected)
    assert not torch.allclose(plain_parts["ce"], smooth_parts["ce"])
