"""Train's validation gate: every ``gate.every`` epochs, ``gate.n`` samples of the averaged
generator (balanced labels, a fixed seed) are scored against the validation images by a judge
(a real-only classifier, :class:`pipeline.infra.judge.Judge`): FD in its feature space and, for
two classes, class fidelity (its AUROC on the samples' intended labels). The best epoch is the
lowest FD among epochs with class fidelity >= ``gate.min_fidelity``; its checkpoint is kept as
``best.pt`` and its record travels in every checkpoint (a resumed run keeps comparing)."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from pipeline.infra.judge import Judge, class_fidelity
from pipeline.infra.quality import frechet_distance
from pipeline.infra.stage_configs import GateConfig


def no_best() -> dict[str, float]:
    return {"fd": math.inf, "epoch": 0, "class_fidelity": math.nan}


class ValidationGate:
    """The gate of one training run (``judge`` None: the gate is off, only ``best`` is kept)."""

    def __init__(
        self,
        cfg: GateConfig,
        judge: Judge | None = None,
        seed: int = 0,
        num_classes: int = 0,
        best: dict[str, float] | None = None,
    ) -> None:
        self.cfg, self.judge, self.seed, self.num_classes = cfg, judge, seed, num_classes
        self.best = best if best is not None else no_best()
        self.reference: torch.Tensor | None = None  # the judge's features of the validation images

    @torch.no_grad()
    def check(self, model: Any, epoch: int, val_ds) -> tuple[dict[str, float], bool]:
        """The gate's metrics of epoch ``epoch`` (0-based) and whether it is the best so far."""
        gate, judge = self.cfg, self.judge
        assert judge is not None, "the gate is off (no gate.judge)"
        model.eval()  # batch norm from its running statistics, which sampling must not move
        labels = torch.arange(gate.n) % max(self.num_classes, 1) if self.num_classes else None
        fake = model.sample(labels, n=gate.n, seed=self.seed + 7919)
        if self.reference is None:  # the same images and judge every time: their features once
            real = torch.stack([val_ds[i]["image"] for i in range(min(gate.n, len(val_ds)))])
            self.reference = judge.features(real).double()
        scores = judge.score(fake)
        out = {"gate/fd": float(frechet_distance(scores.features.double(), self.reference))}
        if self.num_classes == 2:
            out["gate/class_fidelity"] = class_fidelity(judge, scores, labels.numpy(), n_boot=0)["auroc"]
        fid = out.get("gate/class_fidelity", math.nan)
        faithful = not fid < gate.min_fidelity  # NaN (not two classes): no fidelity to fail
        if not faithful:
            print(
                f"WARNING: validation gate, epoch {epoch + 1}: class fidelity {fid:.3f} < {gate.min_fidelity}: "
                "the generator draws images that do not show their label; this epoch cannot become best.pt",
                file=sys.stderr,
                flush=True,
            )
        best = faithful and out["gate/fd"] < self.best["fd"]
        if best:
            self.best = {"fd": out["gate/fd"], "epoch": epoch + 1, "class_fidelity": fid}
        out["gate/best_epoch"] = self.best["epoch"]
        return out, best


def gate_checks(history: dict[str, list[tuple[int, float]]]) -> list[dict[str, float]]:
    """Each gate check of a run (resumed parts included) from its metric record (step -> values)."""
    checks: dict[int, dict[str, float]] = {}
    for name in ("epoch", "gate/fd", "gate/class_fidelity"):
        for step, value in history.get(name, []):
            checks.setdefault(int(step), {})[name] = float(value)
    return [
        {
            "step": s,
            "epoch": c.get("epoch"),
            "fd": c["gate/fd"],
            "class_fidelity": c.get("gate/class_fidelity"),
        }
        for s, c in sorted(checks.items())
        if "gate/fd" in c
    ]
