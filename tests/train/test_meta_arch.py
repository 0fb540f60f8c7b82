"""One DINOv2 training step on a tiny model: shapes, gradients, weighting, teacher update."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.data.augment import MultiCropAugmentation
from dinolab.data.collate import collate_multicrop
from dinolab.losses import SinkhornKnopp, SoftmaxCentering, dino_loss_term_count
from dinolab.models import create_model
from dinolab.models.heads import DINOHead
from dinolab.train.meta_arch import LossWeights, SSLMetaArch

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n_images=4, n_local=2, seed=0):
    torch.manual_seed(seed)
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=n_local, patch_size=4)
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n_images)]
    return collate_multicrop([aug(im) for im in imgs], grid=(8, 8), rng=np.random.default_rng(seed))


def _arch(shared=False, centering="softmax", weights=LossWeights(), packed=False):
    torch.manual_seed(0)
    backbone = create_model("vit_tiny_patch4", depth=2)
    head = DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    ibot = head if shared else DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    make = (lambda: SoftmaxCentering(64)) if centering == "softmax" else (lambda: SinkhornKnopp(3))
    return SSLMetaArch(backbone, head, ibot, dino_centering=make(), ibot_centering=make(), weights=weights,
                       packed_crops=packed)


@pytest.mark.parametrize("shared,centering", [(False, "softmax"), (True, "sinkhorn")])
def test_step_gives_finite_loss_and_student_only_gradients(shared, centering):
    arch = _arch(shared, centering)
    loss, metrics = arch.forward_backward(_batch(), teacher_temp=0.04)
    assert torch.isfinite(loss)
    assert set(metrics) >= {"loss", "dino", "ibot", "koleo", "target_entropy", "prototypes_in_use", "cls_std_x_sqrt_d"}
    assert all(p.grad is None for p in arch.teacher.parameters())
    assert arch.student["backbone"].mask_token.grad.abs().sum() > 0  # masked patches reach the student
    assert arch.student["dino_head"].mlp[0].weight.grad is not None
    assert 1.0 <= metrics["prototypes_in_use"] <= 64 and metrics["log_k"] == pytest.approx(np.log(64))


def test_loss_is_the_weighted_sum_of_components():
    w = LossWeights(dino=0.5, ibot=2.0, koleo=0.3)
    _, m = _arch(weights=w).forward_backward(_batch(), teacher_temp=0.07)
    assert m["loss"] == pytest.approx(0.5 * m["dino"] + 2.0 * m["ibot"] + 0.3 * m["koleo"], rel=1e-5)
    assert dino_loss_term_count(2, 2) == 6


def test_without_local_crops_and_teacher_update():
    arch = _arch()
    loss, _ = arch.forward_backward(_batch(n_local=0), teacher_temp=0.04)
    assert torch.isfinite(loss)
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(1.0)
    arch.update_teacher(0.0)  # momentum 0: the teacher becomes the student
    for (n, t), s in zip(arch.teacher.named_parameters(), arch.student.parameters()):
        assert torch.equal(t, s), n


def test_teacher_starts_as_a_frozen_copy():
    arch = _arch()
    for t, s in zip(arch.teacher.parameters(), arch.student.parameters()):
        assert torch.equal(t, s) and not t.requires_grad and s.requires_grad


def test_teacher_has_no_stochastic_depth():
    from dinolab.models.layers import DropPath

    arch = _arch()
    arch.student["backbone"].blocks[0].drop_path1.p = 0.3  # student keeps its rate
    arch2 = SSLMetaArch(arch.student["backbone"], arch.student["dino_head"], arch.student["ibot_head"],
                        dino_centering=SoftmaxCentering(64), ibot_centering=SoftmaxCentering(64))
    assert all(m.p == 0.0 for m in arch2.teacher.modules() if isinstance(m, DropPath))
    assert arch2.student["backbone"].blocks[0].drop_path1.p == 0.3


@pytest.mark.parametrize("n_local", [2, 0])
def test_packed_crop_pass_gives_the_same_step(n_local):
    """One packed student pass over global + local crops = two separate passes: same loss, same gradients."""
    batch = _batch(n_local=n_local)
    results = []
    for packed in (False, True):
        arch = _arch(packed=packed)
        loss, metrics = arch.forward_backward(batch, teacher_temp=0.04)
        grads = {n: p.grad.clone() for n, p in arch.student.named_parameters() if p.grad is not None}
        results.append((loss, metrics, grads))
    (l0, m0, g0), (l1, m1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert m1["dino"] == pytest.approx(m0["dino"], rel=1e-5) and m1["ibot"] == pytest.approx(m0["ibot"], rel=1e-5)
    assert g1.keys() == g0.keys() and "backbone.mask_token" in g1
    for name, g in g1.items():
        torch.testing.assert_close(g, g0[name], rtol=1e-4, atol=1e-6, msg=name)
