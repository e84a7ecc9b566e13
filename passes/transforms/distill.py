"""distill: fine-tune the graph (the student: pruned, or otherwise changed) against the original model (the teacher).

Knowledge distillation (Hinton et al., 2015). The teacher is the graph the pipeline started from
(``ctx.original``); the student is the current graph run by the reference interpreter as a trainable
``nn.Module``. On every batch of ``optimize(..., data=...)`` the loss per output is

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)

with teacher logits ``t``, student logits ``s`` and temperature ``T`` (the T^2 keeps the soft-target gradients'
scale independent of T). Without labels ``alpha`` is 1. A data item is a tuple of the model's inputs, or the
inputs followed by labels. Adam with learning rate ``lr`` for ``epochs`` passes over the data (shuffled with
``seed``, cosine-decayed learning rate); then the trained weights are written back into the graph. Normalization
statistics stay fixed (batch norms are inference ops in the IR). Items may have a batch size other than the
compiled one: the graph is re-batched for training (input shapes, re-inferred types, the batch entry of reshapes).

Data-parallel under ``torchrun`` (``passes.core.distributed``): rank r trains on items r, r + N, ... (padded to
equal counts), the student wrapped in ``DistributedDataParallel``, teacher targets computed per rank; one step of N
ranks is one step on the global batch of N items. Losses are averaged over the ranks, progress is shown by rank 0,
and rank 0's weights are broadcast before the write-back, so every rank ends with the same graph.

Stats: ``steps`` (optimizer steps), ``loss_start_milli`` and ``loss_end_milli`` (mean loss of the first and last
epoch x 1000); a progress bar (tqdm, on a terminal) shows the epochs when ``ctx.progress`` is set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from passes.core import distributed
from passes.core.pass_base import Decisions, Pass, PassContext, PassError, PassResult
from passes.core.progress import progress_bar
from passes.ir.graph import Graph, flatten_structure
from passes.ir.interpret import GraphModule
from passes.transforms.calibrate import BatchedInterpreter, split_items

FROZEN_PARAMS = ("running_mean", "running_var")


class Student(torch.nn.Module):
    """The student as one ``nn.Module`` over every batch size (``BatchedInterpreter``), so that
    ``DistributedDataParallel`` sees its parameters and every forward goes through it."""

    def __init__(self, run: BatchedInterpreter):
        super().__init__()
        self.module, self.run = run.module, run

    def forward(self, *inputs):
        return self.run(*inputs)


@dataclass(frozen=True)
class Distill(Pass):
    name = "distill"
    summary = "fine-tune the graph against the original model's soft targets (knowledge distillation)"
    lossy = True
    epochs: int = 10
    lr: float = 1e-3
    temperature: float = 2.0
    alpha: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.lr <= 0 or self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0:
            raise PassError("distill: needs epochs >= 1, lr > 0, temperature > 0 and 0 <= alpha <= 1")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("steps",))
        world = distributed.world()
        batches = distributed.shard(self._batches(graph, ctx), world, pad=True)
        if ctx.original is None:
            raise PassError("distill: no teacher (run it in a pipeline or optimize(), or set PassContext.original)")
        torch.manual_seed(self.seed)
        student = GraphModule(graph).train()
        for key, param in student.named_parameters():
            param.requires_grad_(not key.endswith(FROZEN_PARAMS))
        run_student = distributed.data_parallel(Student(BatchedInterpreter(graph, student, "distill")), world)
        run_teacher = BatchedInterpreter(ctx.original, GraphModule(ctx.original).eval(), "distill")
        with torch.no_grad():
            targets = [[t.detach() for t in flatten_structure(run_teacher(*x))] for x, _ in batches]
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs * len(batches))
        order, losses, steps = list(range(len(batches))), [], 0
        rng = random.Random(self.seed)
        bar = progress_bar(range(self.epochs), enabled=ctx.progress is not None and world.main, desc="distill",
                           unit="epoch")
        for _ in bar:
            rng.shuffle(order)
            total = 0.0
            for i in order:
                inputs, labels = batches[i]
                outputs = flatten_structure(run_student(*inputs))
                loss = sum(self._loss(s, t, labels) for s, t in zip(outputs, targets[i]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach())
                steps += 1
            losses.append(float(distributed.all_reduce(total, "sum", world)) / (world.size * len(batches)))
            bar.set_postfix_str(f"loss {losses[-1]:.4f}", refresh=False)
        distributed.broadcast_parameters(student, world)
        student.write_back(graph)
        decide.done(graph.inputs[0], "steps", f"{self.epochs} epochs, loss {losses[0]:.4f} -> {losses[-1]:.4f}",
                    count=steps)
        decide.stats["loss_start_milli"] = round(1000 * losses[0])
        decide.stats["loss_end_milli"] = round(1000 * losses[-1])
        return decide.result()

    def _loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if not student.is_floating_point():
            return student.new_zeros(())
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                        reduction="batchmean") * t * t
        if labels is None or self.alpha == 1.0:
            return soft
        return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(student, labels)

    @staticmethod
    def _batches(graph: Graph, ctx: PassContext) -> list[tuple[tuple, torch.Tensor | None]]:
        """``(inputs, labels or None)`` per data item (``calibrate.split_items``), labels as class indices."""
        if ctx.data is None:
            raise PassError("distill needs training data: optimize(..., data=[(x,), (x, labels), ...])")
        batches = [(inputs, None if labels is None else labels.long())
                   for inputs, labels in split_items(ctx.data, graph, "distill")]
        if not batches:
            raise PassError("distill: the data is empty (a generator can be read only once: pass a list)")
        return batches
