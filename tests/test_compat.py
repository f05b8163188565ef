"""kdops.compat drop-ins against the real packages they replace (installed by the `compat` extra, which
CI installs): same loss and same gradients over a grid of each one's arguments."""

import pytest
import torch
import torch.nn.functional as F

import kdops.compat
from kdops.compat import liger as kliger
from kdops.compat import torchtune as ktune
from kdops.compat import trl as ktrl
from oracle import logit_pair, rel_error

gkd = pytest.importorskip("trl.experimental.gkd", reason="the compat extra installs trl")
tune_loss = pytest.importorskip("torchtune.modules.loss", reason="the compat extra installs torchtune")
liger_chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="the compat extra installs liger-kernel")

TOL = 2e-5


def _finite_pair(shape, seed=0):
    """Logits with a realistic spread and peaked rows, no -inf (where the originals' conventions differ)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g) * 4
    teacher = torch.randn(shape, generator=g) * 4
    teacher.view(-1, shape[-1])[::3, 5] = 30.0
    return student, teacher


def _labels(shape, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::4] = -100
    return labels


def _compare(ours, theirs, inputs):
    """Same value and same gradient for every input that requires grad."""
    tensors = [x for x in inputs if x.requires_grad]
    got = [ours(), theirs()]
    assert got[0].shape == got[1].shape
    assert rel_error(got[0], got[1]) < TOL
    weight = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(1))
    grads = [torch.autograd.grad(v, tensors, weight) for v in got]
    for a, b in zip(*grads):
        assert rel_error(a, b) < TOL


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_trl_generalized_jsd_loss(beta, reduction, with_labels):
    student, teacher = _finite_pair((3, 11, 301))
    student.requires_grad_()
    teacher.requires_grad_()
    labels = _labels((3, 11), 301) if with_labels else None
    kwargs = dict(labels=labels, beta=beta, temperature=1.7, reduction=reduction)
    _compare(lambda: ktrl.generalized_jsd_loss(student, teacher, **kwargs),
             lambda: gkd.GKDTrainer.generalized_jsd_loss(student, teacher, **kwargs), [student, teacher])


@pytest.mark.parametrize("num_items", [17, torch.tensor(23)])
def test_trl_num_items_in_batch(num_items):
    student, teacher = _finite_pair((2, 9, 130), seed=2)
    student.requires_grad_()
    labels = _labels((2, 9), 130)
    kwargs = dict(labels=labels, beta=0.5, num_items_in_batch=num_items)
    _compare(lambda: ktrl.generalized_jsd_loss(student, teacher, **kwargs),
             lambda: gkd.GKDTrainer.generalized_jsd_loss(student, teacher, **kwargs), [student])


@pytest.mark.parametrize("name, args", [
    ("ForwardKLLoss", ()), ("ReverseKLLoss", ()), ("SymmetricKLLoss", (0.3,)), ("SymmetricKLLoss", (1.0,)),
])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_torchtune_losses(name, args, normalize, teacher_grad):
    student, teacher = _finite_pair((40, 257), seed=3)
    student.requires_grad_()
    teacher.requires_grad_(teacher_grad)
    labels = _labels((40,), 257)
    ours, theirs = getattr(ktune, name)(*args), getattr(tune_loss, name)(*args)
    _compare(lambda: ours(student, teacher, labels, normalize), lambda: theirs(student, teacher, labels, normalize),
             [student, teacher])


@pytest.mark.parametrize("name, args", [
    ("ForwardKLWithChunkedOutputLoss", (4,)), ("ReverseKLWithChunkedOutputLoss", (3,)),
    ("SymmetricKLWithChunkedOutputLoss", (4, 0.7)),
])
def test_torchtune_chunked_output_losses(name, args):
    student, teacher = _finite_pair((2, 12, 199), seed=4)
    student.requires_grad_()
    labels = _labels((2, 12), 199)
    chunks = args[0]
    ours, theirs = getattr(ktune, name)(*args), getattr(tune_loss, name)(*args)
    s_chunks, t_chunks = list(student.chunk(chunks, dim=1)), list(teacher.chunk(chunks, dim=1))
    _compare(lambda: ours(s_chunks, t_chunks, labels), lambda: theirs(s_chunks, t_chunks, labels), [student])


def test_torchtune_all_ignored_is_zero():
    student, teacher = _finite_pair((5, 50), seed=5)
    labels = torch.full((5,), -100)
    assert ktune.ForwardKLLoss()(student, teacher, labels) == tune_loss.ForwardKLLoss()(student, teacher, labels) == 0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("shape", [(13, 300), (2, 7, 300)])
def test_hinton_kd_loss(temperature, shape):
    """Against the pattern it replaces, written with torch itself."""
    student, teacher = logit_pair(shape, seed=6)
    student = student.clamp_min(-50).requires_grad_()  # F.kl_div gives NaN where both are 0 after -inf
    teacher = teacher.clamp_min(-50)
    T = temperature
    _compare(lambda: kdops.compat.hinton_kd_loss(student, teacher, T),
             lambda: F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1),
                              reduction="batchmean") * T ** 2, [student])


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (0.3, 0.9)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("bias", [False, True])
def test_liger_fused_linear_jsd_loss(weights, beta, bias):
    g = torch.Generator().manual_seed(7)
    n, hs, ht, vocab = 29, 48, 64, 333
    student_input = torch.randn(n, hs, generator=g).requires_grad_()
    student_weight = (torch.randn(vocab, hs, generator=g) * 4 * hs ** -0.5).requires_grad_()
    teacher_input = torch.randn(n, ht, generator=g)
    teacher_weight = torch.randn(vocab, ht, generator=g) * 4 * ht ** -0.5
    student_bias = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    teacher_bias = torch.randn(vocab, generator=g) if bias else None
    labels = _labels((n,), vocab)
    options = dict(weight_hard_loss=weights[0], weight_soft_loss=weights[1], beta=beta, temperature=1.5)
    ours = kliger.LigerFusedLinearJSDLoss(**options)
    theirs = liger_chunked.LigerFusedLinearJSDLoss(**options, compiled=False, chunk_size=8)
    args = (student_input, student_weight, teacher_input, teacher_weight, labels, student_bias, teacher_bias)
    inputs = [x for x in (student_input, student_weight, student_bias) if x is not None]
    _compare(lambda: ours(*args), lambda: theirs(*args), inputs)

    split = [kliger.LigerFusedLinearJSDLoss(**options, return_soft_hard_loss=True)(*args),
             liger_chunked.LigerFusedLinearJSDLoss(**options, compiled=False, return_soft_hard_loss=True)(*args)]
    for a, b in zip(*split):
        assert rel_error(a, b) < TOL


def test_liger_rejects_different_vocabularies():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one vocabulary size"):
        kliger.LigerFusedLinearJSDLoss()(x, torch.randn(10, 8), x, torch.randn(12, 8), torch.zeros(4, dtype=torch.long))
