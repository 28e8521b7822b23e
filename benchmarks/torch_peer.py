"""The PyTorch peer: the benchmark decoder written in torch, trained in full or with PEFT LoRA.

The same shapes as `benchmarks.models.Decoder` (RMSNorm, separate q/k/v/o and MLP projections
without bias, causal SDPA with grouped-query heads, an untied LM head, next-token cross entropy with
the softmax in float32), bfloat16 weights on a GPU, fused AdamW. ``train_step`` runs these as its
modes ``torch_full``, ``torch_full_compiled``, ``peft`` and ``peft_compiled``, each in its own
process like every other mode, so one results file holds jaxlora and its PyTorch peer side by side.
A ``_ckpt`` suffix (``peft_ckpt``, ``peft_compiled_ckpt``, ``torch_full_ckpt``, ...) adds gradient
checkpointing of every block (``torch.utils.checkpoint``, non-reentrant), as ``--remat`` does for all.
PEFT's adapters follow ``--lora-dtype``: float32 is PEFT's default (``autocast_adapter_dtype=True``:
float32 adapters over the bf16 base), bfloat16 keeps them in the base's dtype.
"""

from __future__ import annotations

import argparse
import time

_BASE_MODES = ("torch_full", "torch_full_compiled", "peft", "peft_compiled")
TORCH_MODES = _BASE_MODES + tuple(f"{m}_ckpt" for m in _BASE_MODES)


def _model(cfg, device, dtype):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
            self.ln1, self.ln2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
            self.q, self.k, self.v = (
                nn.Linear(d, d, bias=False),
                nn.Linear(d, kv, bias=False),
                nn.Linear(d, kv, bias=False),
            )
            self.o = nn.Linear(d, d, bias=False)
            self.gate = nn.Linear(d, cfg.ff, bias=False) if cfg.mlp == "swiglu" else None
            self.up, self.down = nn.Linear(d, cfg.ff, bias=False), nn.Linear(cfg.ff, d, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)
            q = self.q(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
            k = self.k(h).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
            v = self.v(h).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.kv_heads != cfg.n_heads)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, cfg.d_model))
            h = self.ln2(x)
            u = F.silu(self.gate(h)) * self.up(h) if self.gate is not None else F.gelu(self.up(h), approximate="tanh")
            return x + self.down(u)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
            self.layers = nn.ModuleList([Block() for _ in range(cfg.n_layers)])
            self.ln_f = nn.RMSNorm(cfg.d_model, eps=1e-6)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

        def forward(self, tokens):
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.ln_f(x))

    torch.manual_seed(0)
    with torch.device(device):
        return Decoder().to(dtype)


def measure(a: argparse.Namespace) -> dict:
    """Time one torch mode: ``a.mode`` in `TORCH_MODES`, the config and step counts of ``train_step``."""
    import torch
    from torch.nn import functional as F

    from . import common, models

    cfg = models.configure(a.config, a.remat, a.scan, a.override)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = getattr(torch, cfg.dtype)
    mode, checkpointing = a.mode.removesuffix("_ckpt"), a.remat or a.mode.endswith("_ckpt")
    if a.lora_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--lora-dtype {a.lora_dtype!r}: the PEFT peer takes float32 or bfloat16")
    t0 = time.perf_counter()
    model = _model(cfg, device, dtype)
    if mode.startswith("peft"):
        import peft

        targets = a.targets.split(",") if a.targets else list(models.targets(cfg))
        config = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=targets)
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=a.lora_dtype == "float32")
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, fused=gpu)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device)

    def loss_of(tokens):
        logits = model(tokens)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))

    if mode.endswith("compiled"):
        loss_of = torch.compile(loss_of)
    if checkpointing:  # the Linen model's nn.remat: recompute each block in the backward pass
        import torch.utils.checkpoint as ckpt

        for layer in (model.base_model.model if mode.startswith("peft") else model).layers:
            forward = layer.forward
            layer.forward = lambda x, f=forward: ckpt.checkpoint(f, x, use_reentrant=False)
    state = {}

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(tokens)
        loss.backward()
        opt.step()
        state["loss"] = loss.detach()

    def wait():
        if gpu:
            torch.cuda.synchronize()

    def blocking():
        run()
        wait()

    blocking()  # compile
    compile_s = time.perf_counter() - t0
    for _ in range(a.warmup):
        blocking()
    common.sync_point()
    ms = models.timeit(blocking, a.steps, 1)
    piped = models.timeit_pipelined(run, wait, a.steps, a.window)
    out = {
        "mode": a.mode,
        "median_ms": models.median(ms),
        "pipelined_ms": models.median(piped),
        "min_ms": min(ms),
        "step_ms": [round(x, 3) for x in ms],
        "peak_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        "loss": state["loss"].item(),
        "compile_s": round(compile_s, 1),
        "torch": torch.__version__,
        "trainable_params": sum(p.numel() for p in trained),
        "trainable_dtype": str(trained[0].dtype).removeprefix("torch."),
        "gradient_checkpointing": checkpointing,
    }
    if mode.startswith("peft"):
        import peft

        out["peft"] = peft.__version__
    out["tokens_per_s"] = cfg.batch * cfg.seq / (out["median_ms"] / 1e3)
    return out
