"""Knowledge distillation from a frozen teacher: forward KL on temperature-scaled logits, vocab-parallel.

    loss_t = KL(p_teacher(. | x_<t; T) || p_student(. | x_<t; T))     per token, [b, s]

Under tensor parallelism each rank holds a vocabulary shard of the logits [s, b, V/tp]; the
log-softmax normalisers and the KL sum are reduced over the TP group, so the full vocabulary is
never gathered; the gradient w.r.t. the student's shard is the analytic T (p_s - p_t).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps


def _log_softmax_vocab_parallel(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over a vocabulary split across TP ranks (no autograd): [s, b, V/tp] -> [s, b, V/tp]."""
    logits = logits.float()
    m = logits.max(dim=-1, keepdim=True).values
    sum_exp = (logits - m).exp().sum(dim=-1, keepdim=True)
    if ps.get_tensor_model_parallel_world_size() > 1:
        group = ps.get_tensor_model_parallel_group()
        global_m = m.clone()
        torch.distributed.all_reduce(global_m, op=torch.distributed.ReduceOp.MAX, group=group)
        sum_exp = sum_exp * (m - global_m).exp()
        torch.distributed.all_reduce(sum_exp, group=group)
        m = global_m
    return logits - m - sum_exp.log()


class _VocabParallelKL(torch.autograd.Function):
    """Forward KL(teacher || student) with the analytic gradient T (p_s - p_t) w.r.t. student logits,
    as megatron does for vocab-parallel cross entropy: no full-vocab gather, exact under TP."""

    @staticmethod
    def forward(ctx, student, teacher, temperature):
        log_ps = _log_softmax_vocab_parallel(student / temperature)
        log_pt = _log_softmax_vocab_parallel(teacher / temperature)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(kl, group=ps.get_tensor_model_parallel_group())
        ctx.save_for_backward(log_ps, log_pt)
        ctx.temperature = temperature
        return kl * temperature**2

    @staticmethod
    def backward(ctx, grad):
        log_ps, log_pt = ctx.saved_tensors
        g = grad.unsqueeze(-1) * ctx.temperature * (log_ps.exp() - log_pt.exp())
        return g, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token forward KL(teacher || student) at temperature T, times T^2 (Hinton), [s, b] per token.

    Both inputs are vocab-parallel logits [s, b, V/tp]; the teacher gets no gradient.
    """
    return _VocabParallelKL.apply(student_logits.float(), teacher_logits.detach().float(), float(temperature))
