"""Distillation loss of stage 1."""
import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the cross-entropy between teacher and student distributions."""
    teacher_prob = F.softmax(teacher_logits, dim=1)
    return -(teacher_prob * F.log_softmax(student_logits, dim=1)).sum(1).mean()
