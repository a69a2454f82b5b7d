"""Knowledge distillation from the dense model a sparse run starts from (Hinton et al., 2015)."""

import copy

import torch.nn.functional as F


def frozen_teacher(model):
    """A frozen copy of `model` in eval mode: no gradients, no optimizer state, never saved."""
    teacher = copy.deepcopy(model).eval()
    return teacher.requires_grad_(False)


def distillation_loss(student_logits, teacher_logits, hard_loss, *, alpha, temperature):
    """(1 - alpha) * hard_loss + alpha * T^2 * KL(teacher || student) on temperature-softened logits.

    The T^2 factor keeps the soft term's gradients on the scale of the hard term's as T changes.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=-1),
        F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard_loss + alpha * temperature**2 * soft

