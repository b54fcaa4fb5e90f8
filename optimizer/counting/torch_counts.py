"""Parameters, non-zero parameters and FLOPs of a torch.export program (FlopCounterMode, recurrent layers and CPU attention included), by counting_onnx's rule."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.data import take

if TYPE_CHECKING:
    import torch

_TORCH_LINEAR = ("conv", "linear", "addmm", "mm")


def _target_name(node: Any) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)).split(".")[0]


def pt2_params(program: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a torch.export program, over its state_dict and lifted constants.

    The rule is onnx_params's: tensors of more than one element that are floating point or
    8-bit integers (quantized weights); quantization scales and zero points (the arguments 1
    and 2 of quantize / dequantize operators) and integer buffers (counters, indices) are not
    parameters; a BatchNorm in inference mode after a convolution or linear layer counts as
    folded into it (a folded bias is counted where the layer had none). A quantized weight's
    non-zeros are its values that differ from its zero point.
    """
    import torch

    signature = program.graph_signature
    by_placeholder: dict[str, str] = {}
    for mapping in ("inputs_to_parameters", "inputs_to_buffers", "inputs_to_lifted_tensor_constants"):
        by_placeholder.update(getattr(signature, mapping, {}) or {})
    tensors: dict[str, Any] = {**program.state_dict, **program.constants}

    def source(arg: Any) -> str | None:
        return by_placeholder.get(arg.name) if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" else None

    excluded: set[str] = set()
    zero_points: dict[str, tuple[Any, int | None]] = {}
    folded_bias = 0
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = _target_name(node)
        if "batch_norm" in name:
            training = node.args[5] if name == "batch_norm" and len(node.args) > 5 else False
            producer = node.args[0]
            if training or not isinstance(producer, torch.fx.Node) or len(producer.users) != 1:
                continue
            if producer.op != "call_function" or not any(k in _target_name(producer) for k in _TORCH_LINEAR):
                continue
            keys = [source(a) for a in node.args[1:5]]
            excluded.update(k for k in keys if k)
            producer_bias = producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias")
            if producer_bias is None and keys[0] in tensors:
                folded_bias += int(tensors[keys[0]].numel())
        elif "quantize" in name:  # quantize_per_tensor / dequantize_per_channel / ...
            for arg in node.args[1:3]:
                key = source(arg)
                if key:
                    excluded.add(key)
            weight = source(node.args[0])
            if weight and name.startswith("dequantize"):
                axis = node.args[3] if "per_channel" in name and len(node.args) > 3 else None
                zero_points[weight] = (node.args[2] if len(node.args) > 2 else 0, axis)

    quantized = {torch.int8, torch.uint8}
    params, nonzero = folded_bias, folded_bias
    for key, value in tensors.items():
        if key in excluded or not isinstance(value, torch.Tensor) or value.numel() <= 1:
            continue
        if not (value.is_floating_point() or value.dtype in quantized):
            continue
        data = value.detach()
        zero: Any = 0
        if key in zero_points:
            zp, axis = zero_points[key]
            zp_key = source(zp)
            zero = tensors[zp_key] if zp_key else zp
            if isinstance(zero, torch.Tensor) and zero.numel() > 1 and axis is not None:
                shape = [1] * data.dim()
                shape[axis] = zero.numel()
                zero = zero.reshape(shape)
        params += int(data.numel())
        nonzero += int((data != zero).sum()) if data.dtype in quantized else int(torch.count_nonzero(data))
    return params, nonzero


def _cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Q @ K^T and softmax(.) @ V: 2 x B x heads x L x S x (E + Ev); FlopCounterMode knows only the GPU kernels' names."""
    import math

    *batch, length, embed = query
    source, value_embed = key[-2], value[-1]
    return 2 * math.prod(batch) * length * source * (embed + value_embed)


def count_module_flops(module: Any, args: tuple[Any, ...]) -> float:
    """FlopCounterMode's count of one call (2 x MACs of convolutions and matmuls), recurrent layers and CPU attention included.

    oneDNN runs an LSTM / GRU as one fused kernel the counter does not see, so counting turns it
    off: every layer and time step then runs as the matmuls it is made of. scaled_dot_product_attention
    runs on the CPU as a kernel with no formula in torch's table, so we give it one.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.backends.mkldnn.flags warns about its TF32 setting on every use
        with torch.backends.mkldnn.flags(enabled=False), torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            module(*args)
    return float(counter.get_total_flops())


def pt2_flops(program: Any, sample: dict[str, np.ndarray]) -> float:
    """FLOPs of one sample by count_module_flops."""
    import torch

    module = program.module()
    names = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    args, batch = [], 1
    for name in names:
        array = sample.get(name)
        if array is None and len(names) == 1 and len(sample) == 1:
            array = next(iter(sample.values()))
        if array is None:
            raise OptimizerError(f"no sample for input '{name}'")
        value = placeholders[name].meta.get("val") if name in placeholders else None
        shape = getattr(value, "shape", ())
        if len(shape) and isinstance(shape[0], int) and shape[0] > 0:
            batch = shape[0]  # exported for a fixed batch: run at it, divide back
        args.append(array[:1])
    tensors = [torch.from_numpy(np.array(a, copy=True)) for a in take(dict(enumerate(args)), batch).values()]
    return count_module_flops(module, tuple(tensors)) / batch


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_sample(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    """FLOPs of one sample of a trainable module, counted as a .pt2 is counted (count_module_flops)."""
    was_training = module.training
    module.eval()
    flops = count_module_flops(module, tuple(x[:1] for x in example))
    module.train(was_training)
    return flops
