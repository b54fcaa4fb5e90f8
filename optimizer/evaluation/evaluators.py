"""Evaluator plugins: a task metric, in points, chosen by name per model (or `slimserve optimize --evaluator NAME`).

An evaluator is a callable `(outputs, data, reference) -> float`: `outputs` maps each output name of the model to its
array on the evaluation data, `data` is the evaluation .npz (model inputs, 'labels', and any arrays the evaluator reads,
e.g. ground-truth boxes), `reference` is the baseline's outputs on the same data (None when the baseline itself is
scored). It returns a score in points (higher is better, e.g. 0-100); the variant's drop is the baseline's score less
its own, and the accuracy budget holds it like every output's.

Where they come from (the server never runs code a client uploads: only what whoever runs it installed):
- the built-ins below (`classification-top1`, `classification-top5`, `detection`, `segmentation`);
- Python entry points in the group `slimserve.evaluators` of installed packages (name = entry point name);
- `module:attribute` of an importable module.
An entry point or attribute may be a class (instantiated without arguments) or a function.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.evaluation.quality import _BOX_NAME, _LOGITS_NAME, Quality, labelled_output

GROUP = "slimserve.evaluators"

Score = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], "dict[str, np.ndarray] | None"], float]


@dataclass(frozen=True)
class Evaluator:
    """A loaded evaluator: its name, where it came from, and the callable; `score` turns its failures into refusals."""

    name: str
    origin: str  # built-in | entry point <value> | module <path>
    function: Score

    @property
    def key(self) -> str:
        """Its row among the outputs' qualities (Evaluation.qualities)."""
        return f"evaluator:{self.name}"

    def score(self, outputs: dict[str, np.ndarray], data: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None) -> float:
        try:
            value = self.function(outputs, data, reference)
        except OptimizerError as e:
            raise OptimizerError(f"evaluator '{self.name}': {e}") from e
        except Exception as e:  # a plugin's failure is the job's refusal, with its message, never INTERNAL
            raise OptimizerError(f"evaluator '{self.name}' ({self.origin}) raised {type(e).__name__}: {e}") from e
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise OptimizerError(f"evaluator '{self.name}' ({self.origin}) returned {value!r}; it must return a score in points (a number)")
        if not math.isfinite(float(value)):
            raise OptimizerError(f"evaluator '{self.name}' ({self.origin}) returned {value}; it must return a finite score in points")
        return float(value)

    def quality(
        self,
        outputs: dict[str, np.ndarray],
        data: dict[str, np.ndarray],
        reference: dict[str, np.ndarray] | None,
        baseline_score: float | None,
    ) -> Quality:
        value = self.score(outputs, data, reference)
        drop = None if reference is None or baseline_score is None else baseline_score - value
        return Quality(self.key, value, drop)


# ---------------------------------------------------------------------------------------------
# Finding one by name


def builtin_evaluators() -> dict[str, Score]:
    return {
        "classification-top1": lambda o, d, r: classification_topk(o, d, r, 1),
        "classification-top5": lambda o, d, r: classification_topk(o, d, r, 5),
        "detection": detection,
        "segmentation": segmentation,
    }


def installed_evaluators() -> dict[str, Any]:
    """Entry points of the group `slimserve.evaluators`, by name (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available() -> list[str]:
    return sorted(set(builtin_evaluators()) | set(installed_evaluators()))


def load_evaluator(name: str) -> Evaluator:
    """The evaluator called `name`: a built-in, an installed entry point, or `module:attribute`; a precise refusal otherwise."""
    name = (name or "").strip()
    if not name:
        raise OptimizerError(f"no evaluator named; pick one of {', '.join(available())} or give module:attribute")
    builtins = builtin_evaluators()
    if name in builtins:
        return Evaluator(name, "built-in", builtins[name])
    installed = installed_evaluators()
    if name in installed:
        try:
            target = installed[name].load()
        except Exception as e:
            raise OptimizerError(
                f"evaluator '{name}' (entry point {installed[name].value}) cannot be loaded: {type(e).__name__}: {e}"
            ) from e
        return Evaluator(name, f"entry point {installed[name].value}", _callable(name, target))
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise OptimizerError(f"evaluator '{name}': module '{module_name}' cannot be imported: {type(e).__name__}: {e}") from e
        if not hasattr(module, attribute):
            raise OptimizerError(f"evaluator '{name}': module '{module_name}' has no attribute '{attribute}'")
        return Evaluator(name, f"module {module_name}", _callable(name, getattr(module, attribute)))
    raise OptimizerError(
        f"unknown evaluator '{name}': this node has {', '.join(available())}; install a package with an entry point in the "
        f"group '{GROUP}', or name an installed module as module:attribute"
    )


def _callable(name: str, target: Any) -> Score:
    if isinstance(target, type):
        try:
            target = target()
        except Exception as e:
            raise OptimizerError(f"evaluator '{name}': {target.__name__}() raised {type(e).__name__}: {e}") from e
    if not callable(target):
        raise OptimizerError(f"evaluator '{name}' is a {type(target).__name__}, not a callable (outputs, data, reference) -> points")
    return target


# ---------------------------------------------------------------------------------------------
# Classification


def classification_topk(outputs: dict[str, np.ndarray], data: dict[str, np.ndarray], reference: Any, k: int) -> float:
    """Top-k accuracy in points (0-100) on the evaluation data's 'labels', of the classifier output the labels belong to."""
    labels = data.get("labels")
    if labels is None:
        raise OptimizerError("classification needs evaluation data holding 'labels' (the class index of each sample)")
    name = labelled_output(outputs, labels, {})
    if name is None:
        shapes = ", ".join(f"{n} {list(o.shape)}" for n, o in outputs.items())
        raise OptimizerError(
            f"classification needs a classifier's logits [N, classes] wider than the largest label; the outputs are {shapes}"
        )
    logits = outputs[name]
    labels = labels.reshape(-1)
    if len(labels) != len(logits):
        raise OptimizerError(f"'labels' holds {len(labels)} values for {len(logits)} samples")
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(100.0 * np.mean(np.any(top == labels[:, None], axis=1)))


# ---------------------------------------------------------------------------------------------
# Detection: decode, NMS, match by IoU

SCORE_THRESHOLD = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of a [K, 4] with every box of b [M, 4], both x1 y1 x2 y2."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Indices kept by per-class greedy non-maximum suppression, best first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        same = (classes == classes[i]) & ~suppressed
        overlaps = iou_matrix(boxes[i : i + 1], boxes)[0]
        suppressed |= same & (overlaps > iou)
    return np.asarray(keep, dtype=np.int64)


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    return np.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2, b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1)


def decode_detections(outputs: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per sample (boxes x1y1x2y2 [K, 4], scores [K], classes [K]) after the score threshold and NMS.

    Layouts: a box output [N, A, 4] (x1 y1 x2 y2; a box-like name or last dim 4) with a score output [N, A, C] (C classes,
    1 for a single class); or one YOLO-style head [N, A, 5 + C] (cx cy w h, objectness, class scores), or its transposed
    YOLOv8 form [N, 4 + C, A] (cx cy w h, class scores, no objectness).
    """
    three = {n: o for n, o in outputs.items() if o.ndim == 3 and np.issubdtype(o.dtype, np.floating)}
    box_name = next((n for n, o in three.items() if o.shape[2] == 4 and _BOX_NAME.search(n)), None)
    box_name = box_name or next((n for n, o in three.items() if o.shape[2] == 4), None)
    if box_name is not None:
        others = [n for n in three if n != box_name and three[n].shape[1] == three[box_name].shape[1]]
        score_name = next((n for n in others if _LOGITS_NAME.search(n)), others[0] if others else None)
        if score_name is None:
            raise OptimizerError(
                f"detection: output '{box_name}' holds boxes, and no output [N, {three[box_name].shape[1]}, classes] holds their scores"
            )
        boxes, scores = three[box_name], three[score_name]
        class_scores, objectness = scores, None
    else:
        heads = [n for n, o in three.items() if o.shape[2] >= 6 or o.shape[1] >= 5]
        if not heads:
            shapes = ", ".join(f"{n} {list(o.shape)}" for n, o in outputs.items())
            raise OptimizerError(
                f"detection needs boxes [N, A, 4] with scores [N, A, C], or a YOLO-style head [N, A, 5+C]; the outputs are {shapes}"
            )
        head = three[heads[0]]
        if head.shape[1] < head.shape[2] and head.shape[1] >= 5:  # YOLOv8: [N, 4 + C, A]
            head = head.transpose(0, 2, 1)
            boxes, objectness, class_scores = _xywh_to_xyxy(head[..., :4]), None, head[..., 4:]
        else:
            boxes, objectness, class_scores = _xywh_to_xyxy(head[..., :4]), head[..., 4], head[..., 5:]
    result = []
    for i in range(len(boxes)):
        cls_scores = class_scores[i]
        classes = cls_scores.argmax(axis=-1) if cls_scores.shape[-1] > 1 else np.zeros(len(cls_scores), dtype=np.int64)
        score = cls_scores.max(axis=-1)
        if objectness is not None:
            score = score * objectness[i]
        keep = score >= SCORE_THRESHOLD
        b, s, c = boxes[i][keep].astype(np.float64), score[keep].astype(np.float64), classes[keep]
        kept = nms(b, s, c)
        result.append((b[kept], s[kept], c[kept]))
    return result


def match_f1(found: tuple[np.ndarray, np.ndarray, np.ndarray], truth: tuple[np.ndarray, np.ndarray]) -> float:
    """F1 of detections against the truth (boxes, classes): greedy by score, same class, IoU >= MATCH_IOU; 1 when both are empty."""
    boxes, _, classes = found
    true_boxes, true_classes = truth
    if len(boxes) == 0 and len(true_boxes) == 0:
        return 1.0
    ious = iou_matrix(boxes, true_boxes)
    used = np.zeros(len(true_boxes), dtype=bool)
    hits = 0
    for i in range(len(boxes)):  # already best first
        candidates = np.where(~used & (true_classes == classes[i]) & (ious[i] >= MATCH_IOU))[0] if len(true_boxes) else []
        if len(candidates):
            used[candidates[np.argmax(ious[i][candidates])]] = True
            hits += 1
    return 2.0 * hits / (len(boxes) + len(true_boxes))


def detection(outputs: dict[str, np.ndarray], data: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None) -> float:
    """Detection F1 in points at IoU 0.5 after NMS: against 'gt_boxes' [N, M, 4] (x1 y1 x2 y2, rows of -1 pad) and 'gt_classes'
    [N, M] in the data when it has them, else against the baseline's own detections (100: all kept, none added)."""
    found = decode_detections(outputs)
    if "gt_boxes" in data:
        gt_boxes = np.asarray(data["gt_boxes"], dtype=np.float64)
        gt_classes = np.asarray(data.get("gt_classes", np.zeros(gt_boxes.shape[:2])), dtype=np.int64)
        if gt_boxes.ndim != 3 or gt_boxes.shape[0] != len(found) or gt_boxes.shape[2] != 4:
            raise OptimizerError(
                f"'gt_boxes' must be [{len(found)}, M, 4] (x1 y1 x2 y2, rows of -1 for padding), got {list(gt_boxes.shape)}"
            )
        truths = [(b[np.any(b >= 0, axis=1)], c[np.any(b >= 0, axis=1)]) for b, c in zip(gt_boxes, gt_classes)]
    elif reference is not None:
        truths = [(b, c) for b, _, c in decode_detections(reference)]
    else:
        return 100.0  # the baseline against itself
    return float(100.0 * np.mean([match_f1(f, t) for f, t in zip(found, truths)]))


# ---------------------------------------------------------------------------------------------
# Segmentation

_MASK_NAME_HINT = ("mask", "seg", "out")


def masks_of(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Class masks [N, H, W] from a segmentation output: [N, C, H, W] logits (argmax over C), [N, 1, H, W] / [N, H, W]
    probabilities or logits (foreground above 0.5 / 0), or integer class maps."""
    spatial = {n: o for n, o in outputs.items() if o.ndim in (3, 4)}
    if not spatial:
        shapes = ", ".join(f"{n} {list(o.shape)}" for n, o in outputs.items())
        raise OptimizerError(f"segmentation needs a mask output [N, C, H, W] or [N, H, W]; the outputs are {shapes}")
    name = next((n for n in spatial if any(h in n.lower() for h in _MASK_NAME_HINT)), next(iter(spatial)))
    m = spatial[name]
    if not np.issubdtype(m.dtype, np.floating):
        return (m[:, 0] if m.ndim == 4 else m).astype(np.int64)
    if m.ndim == 4 and m.shape[1] > 1:
        return m.argmax(axis=1)
    m = m[:, 0] if m.ndim == 4 else m
    threshold = 0.5 if (m.min() >= 0 and m.max() <= 1) else 0.0
    return (m > threshold).astype(np.int64)


def mean_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over samples of the IoU averaged over the classes either mask holds (1 when both are empty)."""
    scores = []
    for p, t in zip(predicted, truth):
        classes = np.union1d(np.unique(p), np.unique(t))
        ious = [np.sum((p == c) & (t == c)) / max(1, np.sum((p == c) | (t == c))) for c in classes]
        scores.append(float(np.mean(ious)) if ious else 1.0)
    return float(np.mean(scores))


def segmentation(outputs: dict[str, np.ndarray], data: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None) -> float:
    """Mean IoU in points: against 'masks' [N, H, W] (class per pixel) in the data when it has them, else the baseline's masks."""
    predicted = masks_of(outputs)
    if "masks" in data:
        truth = np.asarray(data["masks"])
        truth = truth[:, 0] if truth.ndim == 4 else truth
        if truth.shape != predicted.shape:
            raise OptimizerError(f"'masks' must be {list(predicted.shape)} (a class per pixel), got {list(truth.shape)}")
    elif reference is not None:
        truth = masks_of(reference)
    else:
        return 100.0  # the baseline against itself
    return 100.0 * mean_iou(predicted, truth.astype(np.int64))
