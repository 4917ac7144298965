"""Losses on an LM head's logits that never hold them all at once: `LinearLogits` names hidden @ weight.T (+ bias),
and the losses here project it chunk by chunk of rows.

Why: with a 128k-token vocabulary the logits of one 8 x 2048 batch are 4 GiB in bf16 and 8 GiB once upcast for the
softmax, per head, and the plain path keeps the upcast log-probabilities of every head for backward. Here each chunk
is projected, its fp32 softmax taken, its losses summed, and the gradient for its hidden rows (and for the weight and
bias when they train) computed on the spot, so backward only multiplies by the incoming scalar and nothing is
recomputed: the FLOPs are those of the plain forward plus its backward, the memory one chunk of logits.

The arithmetic follows the plain path (objectives.medusa, objectives.kl) step for step: the projection runs in the
autocast dtype when autocast is on (else the inputs' dtype), softmax and sums in fp32, and the logits' gradient is
cast back to the projection dtype before it meets the weight, as autograd does through `.float()`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.types import LossOutput

DEFAULT_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class LinearLogits:
    """Logits hidden @ weight.T (+ bias) that a loss computes `chunk_size` rows at a time.

    hidden [..., H] (the rows may require grad); weight [V, H] and bias [V] (frozen or trained). skip_uncounted: rows
    the loss does not count (prompt, padding, past the end) are never projected; finding them costs one host sync per
    loss, which pays where many rows are masked (chat data: the prompts) and is skipped when every row counts."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    chunk_size: int = DEFAULT_CHUNK_ROWS
    skip_uncounted: bool = False

    def __post_init__(self):
        if self.weight.numel() == 0:
            raise ValueError("the LM head's weight is empty here, as ZeRO-3 leaves a module's parameters outside its "
                             "forward. Fix: give the loss a frozen copy of the head (recipes.common.frozen_weight), or "
                             "set <recipe>.loss_chunk_size=null")
        if self.chunk_size < 1:
            raise ValueError(f"LM-head chunk_size must be >= 1 row; got {self.chunk_size}")
        if self.hidden.shape[-1] != self.weight.shape[-1]:
            raise ValueError(f"hidden width {self.hidden.shape[-1]} does not match the LM head's {tuple(self.weight.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.hidden.shape[:-1], self.weight.shape[0])

    def rows(self) -> "LinearLogits":
        """The same logits as [N, V] rows (N = every leading position)."""
        return replace(self, hidden=self.hidden.reshape(-1, self.hidden.shape[-1]))


def _projection_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _teacher_probabilities(teacher: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(teacher / temperature) in fp32, the teacher's argmax) of one chunk of teacher logits."""
    if temperature == 1.0:
        p = torch.log_softmax(teacher, dim=-1, dtype=torch.float32).exp_()
    else:
        p = torch.log_softmax(teacher.float() / temperature, dim=-1).exp_()
    return p, teacher.argmax(-1)


def _score_chunk(logits, label, counted, p, teacher_top, label_weight, teacher_weight, temperature, ignore_index,
                 sums, wants_grad):
    """Adds one chunk's [ce, soft_ce, alpha_hat, top1, top1_teacher] over its counted rows into `sums` and returns the
    gradient of label_weight * CE + teacher_weight * softCE with respect to `logits`, in their dtype (None when no
    gradient is wanted or no term has weight). label: None without a hard term; p, teacher_top: the teacher's
    probabilities at `temperature` and its argmax (_teacher_probabilities), None without a soft term. p is only read,
    so several students may be scored against one teacher chunk."""
    # dtype= upcasts inside the kernel: the same values as .float() first, without an fp32 copy of the chunk
    log_q = (torch.log_softmax(logits, dim=-1, dtype=torch.float32)
             if label is not None or temperature == 1.0 else None)
    if label is not None:
        counted = counted & (label != ignore_index)
        safe = label.masked_fill(label == ignore_index, 0)[:, None]
        sums[0] += -(log_q.gather(1, safe).squeeze(1).masked_fill(~counted, 0.0)).sum()
        sums[3] += ((logits.argmax(-1) == label) & counted).sum()
    if p is not None:
        log_q_t = log_q if temperature == 1.0 else torch.log_softmax(logits.float() / temperature, dim=-1)
        sums[1] += (-torch.einsum("nv,nv->n", p, log_q_t)).masked_fill(~counted, 0.0).sum()
        sums[4] += ((logits.argmax(-1) == teacher_top) & counted).sum()
    q = log_q.exp_() if log_q is not None else None
    if p is not None:
        q_t = q if temperature == 1.0 else log_q_t.exp_()
        sums[2] += torch.minimum(q_t, p).sum(-1).masked_fill(~counted, 0.0).sum()
    grad_logits = None
    if wants_grad and p is not None and teacher_weight != 0.0:
        # d softCE / d logits = (softmax(logits / T) - p) / T
        shared = label is not None and label_weight != 0.0 and q_t is q
        scale = counted[:, None] * (teacher_weight / temperature)
        grad_logits = (q_t - p if shared else q_t.sub_(p)).mul_(scale)
    if wants_grad and label is not None and label_weight != 0.0:
        # d CE / d logits = softmax(logits) - onehot(label)
        hard = q.mul_(counted[:, None] * label_weight)
        hard.scatter_add_(1, safe, (counted[:, None] * -label_weight).to(hard.dtype))
        grad_logits = hard if grad_logits is None else grad_logits.add_(hard)
    return None if grad_logits is None else grad_logits.to(logits.dtype)


def _add_chunk_grads(grads, grad_logits, h, weight_c, rows):
    """Adds a chunk's gradient into (hidden, weight, bias) gradients (None: not wanted); rows: the chunk's rows of
    hidden, each at most once."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        grad_hidden[rows] = (grad_logits @ weight_c).to(grad_hidden.dtype)
    if grad_weight is not None:
        grad_weight += (grad_logits.t() @ h).float()
    if grad_bias is not None:
        grad_bias += grad_logits.float().sum(0)


class _ChunkedLinearLosses(torch.autograd.Function):
    """Weighted sum label_weight * CE(labels) + teacher_weight * softCE(teacher) over rows; see the module docstring.

    Returns (loss, metrics) where metrics = [ce, soft_ce, alpha_hat, top1_label, top1_teacher] sums over counted rows
    (counted: mask and label != ignore)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight_matrix, teacher_bias,
                labels, mask, label_weight, teacher_weight, temperature, ignore_index, chunk_size, skip_uncounted,
                need_grads):
        dtype = _projection_dtype(hidden, weight)
        device_type = hidden.device.type
        weight_c = weight.to(dtype)
        bias_c = bias.to(dtype) if bias is not None else None
        teacher_weight_c = teacher_weight_matrix.to(dtype) if teacher_weight_matrix is not None else None
        teacher_bias_c = teacher_bias.to(dtype) if teacher_bias is not None else None
        grad_hidden = torch.zeros_like(hidden) if need_grads[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grads[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_grads[2] else None
        sums = torch.zeros(5, dtype=torch.float32, device=hidden.device)
        wants_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
        counted_rows = None
        if skip_uncounted:
            counted_anywhere = mask if labels is None else mask & (labels != ignore_index)
            index = counted_anywhere.nonzero().squeeze(1)  # the host sync: how many rows count
            if index.numel() < hidden.shape[0]:
                counted_rows = index
        total = hidden.shape[0] if counted_rows is None else counted_rows.numel()
        with torch.autocast(device_type, enabled=False):
            for start in range(0, total, chunk_size):
                rows = (slice(start, start + chunk_size) if counted_rows is None
                        else counted_rows[start:start + chunk_size])
                h = hidden[rows].to(dtype)
                p = top = None
                if teacher_logits is not None or teacher_hidden is not None:
                    teacher = (teacher_logits[rows].detach() if teacher_logits is not None else
                               F.linear(teacher_hidden[rows].detach().to(dtype), teacher_weight_c, teacher_bias_c))
                    p, top = _teacher_probabilities(teacher, temperature)
                    del teacher
                grad_logits = _score_chunk(F.linear(h, weight_c, bias_c), None if labels is None else labels[rows],
                                           mask[rows], p, top, label_weight, teacher_weight, temperature, ignore_index,
                                           sums, wants_grad)
                p = top = None  # a chunk's fp32 rows are freed before the next chunk's are made
                if grad_logits is not None:
                    _add_chunk_grads((grad_hidden, grad_weight, grad_bias), grad_logits, h, weight_c, rows)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        loss = label_weight * sums[0] + teacher_weight * sums[1]
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        scaled = [None if g is None else (g * grad_loss.to(g.dtype)).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        return (*scaled, *([None] * 13))


def chunked_losses(logits: LinearLogits, *, labels: torch.Tensor | None = None,
                   teacher: torch.Tensor | LinearLogits | None = None, mask: torch.Tensor | None = None,
                   label_weight: float = 1.0, teacher_weight: float = 1.0, temperature: float = 1.0,
                   ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """label_weight * Σ CE(logits, labels) + teacher_weight * Σ softCE(teacher -> logits) over counted rows, in one
    projection of the logits. logits: [..., V] as LinearLogits; labels [...] (ignore_index where not scored); teacher:
    logits [..., V] (a tensor) or LinearLogits at the same rows; mask [...] bool (default: every row). A row counts
    where mask holds and its label is not ignored. Metrics: ce, soft_ce, alpha_hat, top1 (argmax == label),
    top1_teacher (argmax == the teacher's argmax), sums over counted rows."""
    if labels is None and teacher is None:
        raise ValueError("chunked_losses needs labels (cross entropy), a teacher (soft cross entropy), or both")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0; got {temperature}")
    leading = logits.shape[:-1]
    student = logits.rows()
    count_mask = torch.ones(leading, dtype=torch.bool, device=student.hidden.device) if mask is None else mask.bool()
    if tuple(count_mask.shape) != tuple(leading) or (labels is not None and tuple(labels.shape) != tuple(leading)):
        raise ValueError(f"mask {tuple(count_mask.shape)} and labels {None if labels is None else tuple(labels.shape)} "
                         f"must match the logits' leading shape {tuple(leading)}")
    teacher_logits = teacher_hidden = teacher_matrix = teacher_bias = None
    if isinstance(teacher, LinearLogits):
        if teacher.shape != logits.shape:
            raise ValueError(f"teacher logits {teacher.shape} and student logits {logits.shape} differ: the draft must "
                             "share the target's vocabulary and be scored at the same positions")
        teacher_hidden, teacher_matrix, teacher_bias = teacher.rows().hidden, teacher.weight, teacher.bias
    elif teacher is not None:
        if tuple(teacher.shape) != tuple(logits.shape):
            raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits {logits.shape} differ: the "
                             "draft must share the target's vocabulary and be scored at the same positions")
        teacher_logits = teacher.reshape(-1, teacher.shape[-1])
    flat_labels = labels.reshape(-1) if labels is not None else None
    flat_mask = count_mask.reshape(-1)
    tracking = torch.is_grad_enabled()
    need_grads = tuple(tracking and t is not None and t.requires_grad for t in (student.hidden, logits.weight, logits.bias))
    loss, sums = _ChunkedLinearLosses.apply(
        student.hidden, logits.weight, logits.bias, teacher_logits, teacher_hidden, teacher_matrix, teacher_bias,
        flat_labels, flat_mask, float(label_weight), float(teacher_weight), float(temperature), ignore_index,
        logits.chunk_size, logits.skip_uncounted, need_grads)
    counted = flat_mask if flat_labels is None else flat_mask & (flat_labels != ignore_index)
    names = ("ce", "soft_ce", "alpha_hat", "top1", "top1_teacher")
    return LossOutput(loss_sum=loss, count=counted.sum(), metrics=dict(zip(names, sums.unbind())))


class _AheadLosses(torch.autograd.Function):
    """chunked_losses of K students against one teacher, student i's flat row r scored against the teacher's row
    r + shifts[i]; each chunk of teacher rows is projected and softmaxed once and scores the matching rows of every
    student. Per student: (hidden, weight, bias, labels or None, counted), counted already restricted to rows whose
    teacher row lies in the same sequence. Returns (losses [K], sums [K, 5]) (the sums as in _ChunkedLinearLosses)."""

    @staticmethod
    def forward(ctx, settings, teacher_logits, teacher_hidden, teacher_matrix, teacher_bias, *students):
        (shifts, label_weight, teacher_weight, temperature, ignore_index, chunk_size, skip_uncounted,
         need_grads) = settings
        students = [students[i:i + 5] for i in range(0, len(students), 5)]
        rows = students[0][0].shape[0]
        device = students[0][0].device
        if teacher_hidden is not None:
            teacher_dtype = _projection_dtype(teacher_hidden, teacher_matrix)
            teacher_matrix_c = teacher_matrix.to(teacher_dtype)
            teacher_bias_c = teacher_bias.to(teacher_dtype) if teacher_bias is not None else None
        converted = {}  # a head's weight in its projection dtype, converted once even when heads share it
        heads = []
        for (hidden, weight, bias, labels, counted), needs in zip(students, need_grads):
            dtype = _projection_dtype(hidden, weight)
            key = (id(weight), dtype)
            converted.setdefault(key, weight.to(dtype))
            grads = (torch.zeros_like(hidden) if needs[0] else None,
                     torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None,
                     torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] else None)
            heads.append((hidden, converted[key], bias.to(dtype) if bias is not None else None, labels, counted,
                          dtype, grads))
        # Teacher row r serves student i at row r - shifts[i]; only rows some student counts are projected.
        needed = torch.zeros(rows, dtype=torch.bool, device=device)
        for (*_, counted), shift in zip(students, shifts):
            needed |= counted.roll(shift)
        teacher_rows = (needed.nonzero().squeeze(1) if skip_uncounted  # the host sync: how many rows count
                        else torch.arange(rows, device=device))
        sums = torch.zeros(len(heads), 5, dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, teacher_rows.numel(), chunk_size):
                chunk = teacher_rows[start:start + chunk_size]
                teacher = (teacher_logits[chunk] if teacher_logits is not None else
                           F.linear(teacher_hidden[chunk].to(teacher_dtype), teacher_matrix_c, teacher_bias_c))
                p, top = _teacher_probabilities(teacher, temperature)
                del teacher
                for i, (head, shift) in enumerate(zip(heads, shifts)):
                    hidden, weight_c, bias_c, labels, counted, dtype, grads = head
                    # A bijection of the rows: the few teacher rows within `shift` of a sequence start map to rows
                    # that counted marks False, so they add nothing and every student row is written at most once.
                    student_rows = (chunk - shift).remainder(rows)
                    h = hidden[student_rows].to(dtype)
                    grad_logits = _score_chunk(F.linear(h, weight_c, bias_c),
                                               None if labels is None else labels[student_rows], counted[student_rows],
                                               p, top, label_weight, teacher_weight, temperature, ignore_index, sums[i],
                                               any(g is not None for g in grads))
                    if grad_logits is not None:
                        _add_chunk_grads(grads, grad_logits, h, weight_c, student_rows)
                p = top = None
        ctx.grads = [grads for *_, grads in heads]
        ctx.dtypes = [(hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
                      for hidden, weight, bias, _, _ in students]
        losses = label_weight * sums[:, 0] + teacher_weight * sums[:, 1]
        ctx.mark_non_differentiable(sums)
        return losses, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, _grad_sums):
        out = [None] * 5  # settings and the teacher: nothing flows into the frozen teacher
        for i, (grads, dtypes) in enumerate(zip(ctx.grads, ctx.dtypes)):
            out += [None if g is None else (g * grad_losses[i].to(g.dtype)).to(dtype)
                    for g, dtype in zip(grads, dtypes)]
            out += [None, None]  # labels and counted
        return tuple(out)


def ahead_losses(students: list[LinearLogits], teacher: torch.Tensor | LinearLogits, shifts: list[int], *,
                 labels: list[torch.Tensor] | None = None, masks: list[torch.Tensor] | None = None,
                 label_weight: float = 1.0, teacher_weight: float = 1.0, temperature: float = 1.0,
                 ignore_index: int = IGNORE_INDEX) -> list[LossOutput]:
    """chunked_losses for heads that each match the teacher some positions ahead (Hydra++, Clover: head i against the
    target's distribution at t + 1 + i): student i at (b, t) is scored against the teacher at (b, t + shifts[i]).

    students: LinearLogits [B, T, V] each; teacher: logits [B, T, V] or LinearLogits [B, T, V] (the target's final
    states and the LM-head rows the students score, so its logits are made here, chunk by chunk); labels / masks: [B, T]
    per student or None (as in chunked_losses). A row counts where its mask holds, its label is not ignored and
    t + shifts[i] < T. Why one pass for all heads: a LinearLogits teacher row serves every head, so it is projected
    once, and only where some head scores it, instead of once per head or at every position. The teacher is frozen:
    no gradient reaches it. Returns one LossOutput per student, with chunked_losses' metrics."""
    if labels is None and teacher_weight == 0.0:
        raise ValueError("ahead_losses needs labels (cross entropy), a teacher weight (soft cross entropy), or both")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0; got {temperature}")
    if len(shifts) != len(students) or min(shifts) < 1:
        raise ValueError(f"one shift >= 1 per student; got {list(shifts)} for {len(students)} students")
    leading = tuple(teacher.shape[:-1])
    if len(leading) != 2 or any(tuple(s.shape) != tuple(teacher.shape) for s in students):
        raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits {[s.shape for s in students]} "
                         "differ: the draft must share the target's vocabulary and be scored at the same positions")
    length = leading[1]
    device = students[0].hidden.device
    position = torch.arange(length, device=device).expand(leading)
    tracking = torch.is_grad_enabled()
    flat, need_grads = [], []
    for i, (student, shift) in enumerate(zip(students, shifts)):
        counted = position + shift < length
        if masks is not None:
            counted = counted & masks[i].bool()
        if labels is not None:
            counted = counted & (labels[i] != ignore_index)
        trained = (student.rows().hidden, student.weight, student.bias)
        flat += [*trained, None if labels is None else labels[i].reshape(-1), counted.reshape(-1)]
        need_grads.append(tuple(tracking and t is not None and t.requires_grad for t in trained))
    if isinstance(teacher, LinearLogits):
        teacher_tensors = (None, teacher.rows().hidden.detach(), teacher.weight.detach(),
                           None if teacher.bias is None else teacher.bias.detach())
    else:
        teacher_tensors = (teacher.detach().reshape(-1, teacher.shape[-1]), None, None, None)
    settings = (tuple(shifts), float(label_weight), float(teacher_weight), float(temperature), ignore_index,
                students[0].chunk_size, any(s.skip_uncounted for s in students), tuple(need_grads))
    losses, sums = _AheadLosses.apply(settings, *teacher_tensors, *flat)
    names = ("ce", "soft_ce", "alpha_hat", "top1", "top1_teacher")
    return [LossOutput(loss_sum=losses[i], count=flat[5 * i + 4].sum(), metrics=dict(zip(names, sums[i].unbind())))
            for i in range(len(students))]


def linear_cross_entropy(logits: LinearLogits, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """Σ CE over rows whose label is not ignore_index: F.cross_entropy(logits.float(), labels, reduction="sum") without
    the logits. Metric top1: rows whose argmax is the label."""
    out = chunked_losses(logits, labels=labels, ignore_index=ignore_index, teacher_weight=0.0)
    return LossOutput(loss_sum=out.loss_sum, count=out.count, metrics={"top1": out.metrics["top1"]})


def linear_soft_cross_entropy(logits: LinearLogits, teacher: torch.Tensor | LinearLogits, mask: torch.Tensor, *,
                              temperature: float = 1.0) -> LossOutput:
    """objectives.kl.soft_cross_entropy without the logits. Metrics: alpha_hat (Σ min(p, q)) and top1 (rows whose
    argmax is the teacher's)."""
    out = chunked_losses(logits, teacher=teacher, mask=mask, temperature=temperature, label_weight=0.0)
    return LossOutput(loss_sum=out.loss_sum, count=out.count,
                      metrics={"alpha_hat": out.metrics["alpha_hat"], "top1": out.metrics["top1_teacher"]})
