"""The teacher-output cache is exact and follows the teacher."""

import contextlib
import warnings

import pytest
import torch

from kdist.cache import compute_teacher_logits, teacher_cache
from kdist.config import KDConfig, StageConfig
from kdist.data import apply_views, to_float
from kdist.models import create_model
from kdist.objectives import Distillation


def small_data(n=24):
    torch.manual_seed(0)
    return torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8), torch.randint(0, 7, (n,))


def test_cached_and_online_distillation_give_the_same_loss():
    images, labels = small_data()
    teacher = create_model("resnet18").eval()
    cache = compute_teacher_logits(teacher, images, batch_size=10)
    kd = KDConfig(temperature=3.0, alpha=0.8)
    student = create_model("student")
    online = Distillation(StageConfig(), kd, teacher=teacher)
    cached = Distillation(StageConfig(), kd, teacher_logits_cache=cache)
    # the online teacher is frozen: eval mode, no gradients
    assert not cached.cache.requires_grad and online.teacher.training is False
    assert not any(p.requires_grad for p in online.teacher.parameters())

    indices = torch.tensor([3, 0, 17, 9, 22, 5, 11, 1])
    views = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    augmented = apply_views(images[indices], views)
    batch = (to_float(augmented), labels[indices], indices, views)
    torch.testing.assert_close(
        cached.teacher_logits(batch[0], indices, views),
        online.teacher_logits(batch[0], indices, views),
        atol=1e-4,
        rtol=1e-4,
    )
    student.eval()  # same student forward for both (no dropout randomness)
    logits = student(batch[0])
    images, batch_labels = batch[0], batch[1]
    cached_loss, cached_parts = cached.loss(logits, batch_labels, cached.targets(images, indices, views))
    online_loss, _ = online.loss(logits, batch_labels, online.targets(images, indices, views))
    torch.testing.assert_close(cached_loss, online_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_loss, 0.8 * cached_parts["kd"] + 0.2 * cached_parts["ce"])


def test_view_mean_teacher_is_the_same_cached_and_online_and_for_every_view():
    images, labels = small_data(8)
    teacher = create_model("resnet18").eval()
    cache = compute_teacher_logits(teacher, images)
    kd = KDConfig(teacher_views="mean")
    online = Distillation(StageConfig(), kd, teacher=teacher)
    cached = Distillation(StageConfig(), kd, teacher_logits_cache=cache)
    indices = torch.arange(8)
    expected = cache.mean(dim=1)  # by hand: each image's logits averaged over its 8 views
    for view in range(8):  # whichever view the student sees, the target is the same
        views = torch.full((8,), view)
        shown = to_float(apply_views(images, views))
        torch.testing.assert_close(cached.teacher_logits(shown, indices, views), expected)
        torch.testing.assert_close(online.teacher_logits(shown, indices, views), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, cache[:, 0], atol=1e-3)  # and it differs from the per-view target


def test_cache_is_reused_and_rebuilt_when_the_teacher_changes(tmp_path):
    images, labels = small_data(8)
    teacher = create_model("student").eval()
    first = teacher_cache(teacher, images, labels, tmp_path)
    assert len(list(tmp_path.glob("teacher_logits-*.safetensors"))) == 1
    torch.testing.assert_close(teacher_cache(teacher, images, labels, tmp_path), first)
    assert len(list(tmp_path.glob("teacher_logits-*.safetensors"))) == 1  # reused, not recomputed

    with torch.no_grad():
        teacher.backbone.classifier[1].weight.mul_(2.0)  # the teacher changes
    second = teacher_cache(teacher, images, labels, tmp_path)
    assert len(list(tmp_path.glob("teacher_logits-*.safetensors"))) == 2
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, compute_teacher_logits(teacher, images))

    changed = images.clone()
    changed[0] ^= 1  # the data changes
    teacher_cache(teacher, changed, labels, tmp_path)
    assert len(list(tmp_path.glob("teacher_logits-*.safetensors"))) == 3


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    images, labels = small_data(4)
    teacher = create_model("student").eval()
    expected = teacher_cache(teacher, images, labels, tmp_path)
    (path,) = tmp_path.glob("teacher_logits-*.safetensors")
    path.write_bytes(b"truncated")
    torch.testing.assert_close(teacher_cache(teacher, images, labels, tmp_path), expected)


@pytest.mark.study
def test_compiled_online_teacher_gives_the_eager_teachers_logits():
    images, labels = small_data(16)
    teacher = create_model("student")  # small: compiling costs seconds, not minutes
    eager = Distillation(StageConfig(), KDConfig(), teacher=teacher)
    compiled = Distillation(StageConfig(), KDConfig(compile_teacher=True), teacher=teacher)
    assert isinstance(compiled.teacher, torch._dynamo.eval_frame.OptimizedModule)
    frozen = compiled.teacher._orig_mod  # a frozen copy (BatchNorms folded): the caller's model is left as it was
    assert frozen is not teacher and not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    views = torch.arange(16) % 8
    shown = to_float(apply_views(images, views))
    indices = torch.arange(16)
    expected = eager.teacher_logits(shown, indices, views)
    torch.testing.assert_close(compiled.teacher_logits(shown, indices, views), expected, atol=1e-4, rtol=1e-4)


def test_online_teacher_in_bf16_alone_keeps_the_student_in_float32():
    """kd.teacher_precision bf16: the teacher's forward in bfloat16 (logits near float32's), while the
    student's logits and loss stay float32."""
    torch.manual_seed(0)
    teacher = create_model("teacher", input_size=64).eval()
    images, indices, views = torch.rand(8, 3, 28, 28), torch.arange(8), torch.zeros(8, dtype=torch.long)
    exact = Distillation(StageConfig(), KDConfig(), teacher=teacher).to("cpu")
    low = Distillation(StageConfig(), KDConfig(teacher_precision="bf16"), teacher=teacher)
    with pytest.warns(UserWarning) if not torch.ops.mkldnn._is_mkldnn_bf16_supported() else contextlib.nullcontext():
        low = low.to("cpu")
    reference, approx = exact.teacher_logits(images, indices, views), low.teacher_logits(images, indices, views)
    assert approx.dtype == torch.float32 and not torch.equal(approx, reference)
    torch.testing.assert_close(approx, reference, atol=0.2, rtol=0.05)
    loss, _ = low.loss(torch.randn(8, 7, requires_grad=True), torch.randint(0, 7, (8,)), approx)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("teacher_views", ["one", "mean"])
def test_online_teacher_split_across_cpu_threads_gives_one_forwards_logits(teacher_views):
    """On a CPU with several intra-op threads the online teacher runs one chunk of the batch per thread (each with
    one intra-op thread): the logits of one forward, in float32 and in bf16 (the teacher cast once)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        teacher = create_model("student", input_size=64).eval()  # any frozen model; SqueezeNet keeps it quick
        images, labels = small_data(10)
        shown, indices, views = to_float(images), torch.arange(10), torch.zeros(10, dtype=torch.long)
        for precision in ("same", "bf16"):
            kd = KDConfig(teacher_views=teacher_views, teacher_precision=precision)
            whole = Distillation(StageConfig(), kd, teacher=teacher)  # not moved: no pool, float32 ...
            if precision == "bf16":  # ... or cast to bf16 by hand
                whole.teacher_dtype = torch.bfloat16
                whole.teacher.to(torch.bfloat16)
            with warnings.catch_warnings():  # bf16 emulated on CPUs without bf16 units: warned, still correct
                warnings.simplefilter("ignore")
                split = Distillation(StageConfig(), kd, teacher=teacher).to("cpu")
            assert split.teacher_threads == 2 and whole.teacher_pool is None
            expected = whole.teacher_logits(shown, indices, views)
            got = split.teacher_logits(shown, indices, views)
            assert got.dtype == torch.float32 and got.shape == (10, 7)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.get_num_threads() == 2  # the main thread keeps its threads
    finally:
        torch.set_num_threads(threads)
