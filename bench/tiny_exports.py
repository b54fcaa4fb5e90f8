"""Tiny transformers defined in torch as the model families write them, and their ONNX exports by either torch.onnx exporter.

Used by tests/optimizer/test_onnx_heads_exports.py and `python -m bench.bench_onnx_heads --tiny`: a BERT layer as
Hugging Face writes it (view(size()[:-1] + (H, d))), a GPT-2 block (fused QKV in Conv1D, split, a causal mask from a
buffer, gelu_new), a Llama block (RMSNorm, 4 Q heads reading 2 K / V heads with rotary positions, a SwiGLU FFN) and
timm's ViT attention (fused qkv reshaped to [B, N, 3, H, d] and unbound) and torch's nn.TransformerEncoder
(nn.MultiheadAttention).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

VOCAB, SEQ, HIDDEN = 40, 8, 32


class BertLayer(nn.Module):
    """Hugging Face's BertSelfAttention / BertSelfOutput / BertIntermediate / BertOutput, written out: view(size()[:-1] + (H, d))."""

    def __init__(self, heads: int = 4, ffn: int = 64, flat: bool = False) -> None:
        super().__init__()
        self.heads, self.d, self.flat = heads, HIDDEN // heads, flat
        self.query, self.key, self.value, self.dense = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.intermediate, self.output = nn.Linear(HIDDEN, ffn), nn.Linear(ffn, HIDDEN)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.heads, self.d)).permute(0, 2, 1, 3)  # noqa: RUF005 (Hugging Face's code, as exported)

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """flat: on the [B * S, H] rows, viewed back (exported as a Gemm with transB)."""
        return layer(x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1], -1) if self.flat else layer(x)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split(self.linear(m, x)) for m in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d) + bias
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(ctx.size()[:-2] + (self.heads * self.d,))  # noqa: RUF005 (Hugging Face's code, as exported)
        x = self.norm1(x + self.linear(self.dense, ctx))
        return self.norm2(x + self.linear(self.output, F.gelu(self.linear(self.intermediate, x))))


class Bert(nn.Module):
    def __init__(self, flat: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(BertLayer(flat=flat) for _ in range(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        return x.mean(1)


class Conv1D(nn.Module):
    """GPT-2's linear layer: a [in, out] weight applied by addmm on the input viewed as 2-D, viewed back."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005 (Hugging Face's code, as exported)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Gpt2Block(nn.Module):
    """GPT-2's block: one c_attn to 3 x hidden split into Q / K / V, a causal mask from a buffer, gelu_new, Conv1D everywhere."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.d = heads, HIDDEN // heads
        self.ln_1, self.ln_2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.c_attn, self.c_proj = Conv1D(3 * HIDDEN, HIDDEN), Conv1D(HIDDEN, HIDDEN)
        self.c_fc, self.mlp_proj = Conv1D(4 * HIDDEN, HIDDEN), Conv1D(HIDDEN, 4 * HIDDEN)
        self.register_buffer("bias", torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)).view(1, 1, SEQ, SEQ))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.heads, self.d)).permute(0, 2, 1, 3)  # noqa: RUF005 (Hugging Face's code, as exported)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).split(HIDDEN, dim=2)
        q, k, v = self.split(q), self.split(k), self.split(v)
        w = torch.matmul(q, k.transpose(-1, -2)) / (float(v.size(-1)) ** 0.5)
        s = w.size(-1)
        w = torch.where(self.bias[:, :, :s, :s], w, torch.tensor(-1e4, dtype=w.dtype))
        a = torch.matmul(w.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        x = x + self.c_proj(a.view(a.size()[:-2] + (HIDDEN,)))  # noqa: RUF005 (Hugging Face's code, as exported)
        h = self.c_fc(self.ln_2(x))
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return x + self.mlp_proj(h)


class Gpt2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Gpt2Block() for _ in range(2))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return x


class RMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Llama's: each K / V head repeated for the n_rep Q heads that read it (expand, then reshape)."""
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class LlamaBlock(nn.Module):
    """Llama's decoder layer: RMSNorm, 4 Q heads reading 2 K / V heads with rotary positions, and a SwiGLU FFN, no biases."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, ffn: int = 64) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, HIDDEN // heads
        self.q_proj = nn.Linear(HIDDEN, heads * self.d, bias=False)
        self.k_proj = nn.Linear(HIDDEN, kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(HIDDEN, kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(heads * self.d, HIDDEN, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, ffn, bias=False), nn.Linear(HIDDEN, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, HIDDEN, bias=False)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, s, -1, self.d).transpose(1, 2)
        k = self.k_proj(h).view(b, s, -1, self.d).transpose(1, 2)
        v = self.v_proj(h).view(b, s, -1, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        n_rep = self.heads // self.kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        w = torch.matmul(q, k.transpose(2, 3)) * self.d**-0.5 + mask
        o = torch.matmul(w.softmax(-1), v).transpose(1, 2).reshape(b, s, -1)
        x = x + self.o_proj(o)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Phi3Block(LlamaBlock):
    """Phi-3's layout of the same block: one qkv_proj to Q | K | V of unequal widths (4 Q heads, 2 K / V heads), split by
    sizes, and one gate_up_proj chunked into gate and up."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(HIDDEN, (self.heads + 2 * self.kv_heads) * self.d, bias=False)
        self.gate_up_proj = nn.Linear(HIDDEN, 2 * 64, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.input_layernorm(x)
        q, k, v = self.qkv_proj(h).split([self.heads * self.d, self.kv_heads * self.d, self.kv_heads * self.d], dim=-1)
        q, k, v = (t.view(b, s, -1, self.d).transpose(1, 2) for t in (q, k, v))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        n_rep = self.heads // self.kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        w = torch.matmul(q, k.transpose(2, 3)) * self.d**-0.5 + mask
        x = x + self.o_proj(torch.matmul(w.softmax(-1), v).transpose(1, 2).reshape(b, s, -1))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, block: type[LlamaBlock] = LlamaBlock) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(block() for _ in range(2))
        d = HIDDEN // 4
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
        self.register_buffer("causal", torch.full((SEQ, SEQ), -1e4).triu(1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        s = input_ids.shape[1]
        freqs = torch.arange(s, dtype=torch.float32)[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = self.causal[:s, :s][None, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


class VitAttention(nn.Module):
    """timm's Attention: qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4), then unbind(0) (Split or Slice, and Squeeze)."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.d = heads, HIDDEN // heads
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.d**-0.5
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Vit(nn.Module):
    """Pre-LN ViT blocks as timm writes them (the patch embedding replaced by a token embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(HIDDEN), "attn": VitAttention(), "norm2": nn.LayerNorm(HIDDEN),
                           "fc1": nn.Linear(HIDDEN, 64), "fc2": nn.Linear(64, HIDDEN)})
            for _ in range(2)
        )  # fmt: skip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for blk in self.blocks:
            x = x + blk["attn"](blk["norm1"](x))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["norm2"](x))))
        return x


class TorchEncoder(nn.Module):
    """torch's own nn.TransformerEncoder: nn.MultiheadAttention unflattens a fused in_proj and folds the heads into the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        with torch.no_grad():  # its layers start as copies of one: the exporter would merge their equal weights into tied ones
            for p in self.encoder.parameters():
                p.add_(torch.randn_like(p) * 0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(input_ids))


MODELS = {
    "bert": Bert,
    "bert-gemm": lambda: Bert(flat=True),
    "gpt2": Gpt2,
    "llama": Llama,
    "phi3": lambda: Llama(Phi3Block),
    "vit": Vit,
    "torch-mha": TorchEncoder,
}


def feeds(model: str, rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (rows, SEQ)).astype(np.int64)
    if not model.startswith("bert"):
        return {"input_ids": ids}
    mask = (np.arange(SEQ)[None] < rng.integers(3, SEQ + 1, rows)[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def export(name: str, exporter: str, path, fold: bool = True) -> None:
    """The model written by torch.onnx: 'torchscript-11' / -14 / -17 (dynamo=False) or 'dynamo', with a free batch;
    fold False: TorchScript's weights left behind their Transposes (do_constant_folding=False)."""
    torch.manual_seed(0)
    export_module(MODELS[name]().eval(), feeds(name, 2, 0), exporter, path, fold)


def export_module(module, example: dict[str, np.ndarray], exporter: str, path, fold: bool = True) -> None:
    """`module` on the inputs `example` (by name) written by torch.onnx as `export` says (bench_onnx_heads: MiniLM)."""
    args = tuple(torch.from_numpy(v) for v in example.values())
    names = list(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=64)
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=names, output_names=["output"], dynamic_shapes={n: {0: batch} for n in names}
            )
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=["output"],
                dynamic_axes={n: {0: "batch"} for n in [*names, "output"]},
                opset_version=int(exporter.split("-")[1]),
                do_constant_folding=fold,
            )
