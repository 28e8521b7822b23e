"""A CPU smoke run of the benchmark scripts on a tiny model (the numbers are not checked, only the plumbing)."""

import argparse
import json

import numpy as np
import pytest
from helpers import jaxpr_parts

from benchmarks import inference, train_step


def _args(mode, **kw):
    base = dict(config="tiny", mode=mode, rank=4, remat=False, scan=False, steps=2, warmup=1, window=2,
                override="{}", hlo=None, profile=None, targets="", lora_dtype="float32", buffers=None,
                policy="block")  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("mode", ["full", "lora", "nnx", "merge", "frozen", "lora_single", "lora_factored", "dora"])
def test_train_step_modes_run(mode):
    out = train_step._worker(_args(mode))
    assert out["mode"] == mode and out["median_ms"] > 0 and len(out["step_ms"]) == 2 and out["pipelined_ms"] > 0
    assert out["loss"] == pytest.approx(out["loss"])  # finite


@pytest.mark.parametrize("opts", [dict(remat=True), dict(scan=True), dict(targets="q,v", lora_dtype="bfloat16")])
def test_train_step_remat_and_scan(opts):
    assert train_step._worker(_args("lora", **opts))["median_ms"] > 0


def test_train_step_records_the_compiled_steps_memory_analysis():
    """Full fine-tuning donates all its arguments but the tokens; LoRA donates its factors and their
    optimizer state, not the frozen weights (float32 in the tiny config)."""
    from benchmarks import models

    full, lora = (train_step._worker(_args(mode))["memory_analysis"] for mode in ("full", "lora"))
    tokens, frozen = 2 * 32 * 4, 4 * models.configure("tiny").params()  # int32 tokens (batch, seq); float32 weights
    assert full["temp_size_in_bytes"] > 0 and lora["temp_size_in_bytes"] > 0
    assert full["argument_size_in_bytes"] - full["alias_size_in_bytes"] == tokens, full
    assert lora["argument_size_in_bytes"] - lora["alias_size_in_bytes"] == tokens + frozen, lora
    assert lora["argument_size_in_bytes"] < full["argument_size_in_bytes"]


def test_train_step_says_when_xla_wrote_no_buffers(tmp_path):
    """This process's backend started without --xla_dump_to, so a worker asked for its buffers must say so."""
    with pytest.raises(RuntimeError, match="XLA wrote no buffer assignment there"):
        train_step._worker(_args("frozen", buffers=str(tmp_path)))


def test_buffers_parses_a_dump_without_a_peak_section(tmp_path):
    """The older single-file form, and a tuple-shaped value: the temp allocations' values stand in for the peak."""
    from benchmarks import buffers

    (tmp_path / "m.after_optimizations-buffer-assignment.txt").write_text(
        "BufferAssignment:\n"
        "allocation 0: size 1024, parameter 0, shape |f32[16,16]| at ShapeIndex {}:\n"
        " value: <0 p.1 @0> (size=1024,offset=0): f32[16,16]{1,0}\n"
        "allocation 1: size 2048, preallocated-temp:\n"
        " value: <1 dot.2 @0> (size=1024,offset=0): f32[16,16]{1,0}\n"
        " value: <2 fusion.3{1} @0> (size=1024,offset=1024): f32[16,16]{1,0}\n"
        "allocation 2: size 16, output shape is |(f32[2], f32[2])|, maybe-live-out:\n"
        " value: <3 tuple.4{} @0> (size=16,offset=0): (f32[2]{0}, /*index=1*/f32[2]{0})\n"
    )
    (tmp_path / "m.after_optimizations.txt").write_text(
        '  %dot.2 = f32[16,16]{1,0} dot(%p.1, %p.1), metadata={op_name="jit(f)/dot_general"}\n'
    )
    m = buffers.read(str(tmp_path))
    assert m["totals"] == {"parameter": 1024, "preallocated-temp": 2048, "output": 16, "maybe-live-out": 16,
                           "total": 3088}  # fmt: skip
    assert [(v["name"], v["op"], v["source"]) for v in m["peak"]] == [
        ("dot.2{}", "dot", "jit(f)/dot_general"),
        ("fusion.3{1}", "?", ""),
    ]
    [g] = buffers.groups(m["peak"])
    assert (g["shape"], g["origin"], g["count"], g["bytes"]) == ("f32[16,16]", "computed", 2, 2048)


@pytest.mark.slow
def test_driver_runs_each_mode_in_its_own_process_writes_json_and_dumps_buffers(tmp_path, capsys):
    """One driver run (full, lora, dora): the JSON, each mode's ratio to full fine-tuning, the DoRA/LoRA
    ratio it prints; with --buffers each worker's XLA writes its programs' buffer assignment, and
    benchmarks.buffers finds the step in each, agrees with its memory_analysis, and finds the LoRA factors
    (rank 4) that full lacks."""
    from benchmarks import buffers

    path, dumps = tmp_path / "r.json", tmp_path / "buf"
    train_step.main(["--config", "tiny", "--modes", "full,lora,dora", "--steps", "2", "--warmup", "1", "--rank", "4",
                     "--buffers", str(dumps), "--out", str(path)])  # fmt: skip
    result = json.loads(path.read_text())
    assert result["device"] and result["versions"]["jax"] and result["config"]["d_model"] == 64
    modes = result["modes"]
    assert set(modes) == {"full", "lora", "dora"}
    assert modes["full"]["ratio_to_full"] == 1.0
    assert "median_ms" in modes["lora"], modes["lora"]
    assert modes["dora"]["ratio_to_lora"] > 0
    assert modes["full"]["compile_ratio_to_full"] == 1.0
    assert modes["lora"]["compile_ratio_to_full"] == pytest.approx(
        modes["lora"]["compile_s"] / modes["full"]["compile_s"]
    )
    printed = capsys.readouterr().out
    assert "dora/lora: step" in printed
    assert f"lora {modes['lora']['compile_s']} ({modes['lora']['compile_ratio_to_full']:.3f})" in printed
    got = buffers.main([modes["full"]["buffers"], modes["lora"]["buffers"], "--json", str(tmp_path / "b.json")])
    assert got == json.loads((tmp_path / "b.json").read_text())
    for mode in ("full", "lora"):
        r, memory = got[mode], modes[mode]["memory_analysis"]
        assert "jit_step" in r["module"] and r["groups"], r["module"]
        assert r["totals"]["parameter"] == memory["argument_size_in_bytes"]
        assert r["totals"]["preallocated-temp"] == memory["temp_size_in_bytes"]  # so on the CPU
        assert 0 < r["peak_bytes"] <= r["totals"]["total"]
    kept = {(d["shape"], d["origin"]): d for d in got["kept_by_lora_not_full"]}
    a = kept["f32[64,4]", "argument"]  # each layer's q, k, v, o and up factor a, its adam mu and nu: 2 * 5 * 3
    assert (a["count_first"], a["count_second"], a["extra_bytes"]) == (0, 30, 30 * 64 * 4 * 4)


@pytest.mark.parametrize("mode", ["torch_full", "peft"])
def test_torch_peer_modes_run(mode):
    pytest.importorskip("torch", reason="the PyTorch peer needs torch (the peft extra)")
    pytest.importorskip("peft", reason="the PyTorch peer needs peft (the peft extra)")
    out = train_step._worker(_args(mode))
    assert out["mode"] == mode and out["median_ms"] > 0 and out["trainable_params"] > 0
    assert out["loss"] == pytest.approx(out["loss"])  # finite


@pytest.mark.parametrize("mode", ["merged", "unmerged", "merge_donated", "copy"])
def test_inference_modes_run(mode):
    out = inference._worker(_args(mode, steps=2))
    assert out["median_ms"] > 0
    if mode == "copy":
        assert out["weight_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora_experts"])
def test_moe_modes_run(mode):
    from benchmarks import moe

    a = argparse.Namespace(config="tiny", mode=mode, rank=4, expert_rank="per_expert", mu_dtype="bfloat16",
                           ragged_lowering="xla", steps=2, window=2, warmup=0, override='{"n_layers": 1}')  # fmt: skip
    out = moe._measure(a)
    assert out["mode"] == mode and out["median_ms"] > 0 and out["loss"] == pytest.approx(out["loss"])
    if mode == "lora_experts":
        assert out["trainable"] > 0


@pytest.mark.parametrize("mode", ["train_nf4", "decode_nf4", "decode_bf16"])
def test_qlora_modes_run(mode, tmp_path):
    from benchmarks import qlora

    # the NF4 step under a jaxlora.remat_policy (tiny_scan has remat): the names reach a quantized base
    from jaxlora import _qmatmul

    setting = "128,128,4,3,4096,1,reduce+words" if mode == "decode_nf4" else ""  # the worker sets the kernel's
    a = argparse.Namespace(config="tiny_scan", mode=mode, rank=4, steps=1, warmup=0, override="{}", qmatmul=setting,
                           decode_batches="1,8", cache=16, cache_form="xs", policy="outputs",
                           profile=str(tmp_path / "p") if mode == "decode_bf16" else "")  # fmt: skip
    try:
        out = qlora._measure(a)
    finally:
        _qmatmul.configure("")
    assert out["qmatmul_setting"] == setting and out["qmatmul"]["WORDS"] == bool(setting)
    assert out["bits_per_parameter"] < 16 if mode.endswith("nf4") else out["bits_per_parameter"] == 16
    assert out.get("median_ms", 1) > 0
    assert out.get("loss", 0.0) == pytest.approx(out.get("loss", 0.0))  # finite
    if mode.startswith("decode"):
        assert set(out["decode"]) == {"1", "8"} and all(d["tokens_per_s"] > 0 for d in out["decode"].values())
    if mode == "decode_bf16":  # --profile: a trace and the HLO per batch
        assert {f"p_decode_bf16_b{b}.{ext}" for b in (1, 8) for ext in ("hlo.txt", "trace.json.gz")} <= {
            f.name for f in tmp_path.iterdir()
        }


def test_qlora_base_bytes_from_shapes_alone():
    """The NF4 base against bf16 for the tiny model, against the layout's own arithmetic: each
    quantized matrix of n elements is n/2 code bytes + n/64 int8 scales (+ float32 per 256 scales)."""
    import math

    from benchmarks import models, qlora

    cfg = models.configure("tiny_scan")
    got = qlora.stored_base_bytes("tiny_scan")
    d, ff, kv, L, V = cfg.d_model, cfg.ff, cfg.kv_heads * cfg.head_dim, cfg.n_layers, cfg.vocab
    kernels = L * (2 * d * d + 2 * d * kv + 3 * d * ff)  # q, o; k, v; gate, up, down
    norms = 2 * L * d + d

    def nf4(n, outer):  # bytes of one quantized leaf: n elements a slice, `outer` slices
        groups = math.ceil(n // 64 / 256)
        return outer * (n // 2 + groups * 256 + 4 * groups + 4)

    layer_nf4 = sum(nf4(n, L) for n in (d * d, d * d, d * kv, d * kv, d * ff, d * ff, d * ff))
    assert got["bf16"] == 2 * (kernels + norms + 2 * V * d)
    assert got["default"] == layer_nf4 + 2 * (norms + 2 * V * d)  # embed and lm_head in bf16
    assert got["every_matrix"] == layer_nf4 + 2 * nf4(V * d, 1) + 2 * norms
    assert got["kept_float_in_default"] == ["embed", "lm_head"]


@pytest.mark.slow
def test_qlora_driver_writes_json(tmp_path):
    from benchmarks import qlora

    path = tmp_path / "q.json"
    qlora.main(["--config", "tiny_scan", "--modes", "train_bf16,train_nf4", "--big", "tiny_scan", "--batches", "2",
                "--big-seq", "32", "--steps", "1", "--warmup", "0", "--policy", "minimal",
                "--out", str(path)])  # fmt: skip
    result = json.loads(path.read_text())
    assert result["remat_policy"] == "minimal"
    assert result["modes"]["train_nf4"]["base_ratio_to_bf16"] < 0.5, result["modes"]
    assert result["big"]["largest"]["batch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", ["base", "unmerged", "mixed8", "mixed64", "mixed64_of1024", "prefill_mixed8", "train_stack8"]
)
def test_multi_adapter_modes_run(mode):
    from benchmarks import multi_adapter

    a = argparse.Namespace(config="tiny", mode=mode, rank=4, lora_dtype="float32", decode_batch=4, prefill_batch=2,
                           cache=16, steps=2, warmup=1, override="{}")  # fmt: skip
    out = multi_adapter._worker(a)
    assert out["pipelined_ms"] > 0 and out["tokens_per_s"] > 0
    if mode == "base":
        assert out["copy_gb_per_s"] > 0 and out["kv_bytes"] == 2 * 2 * 16 * 4 * 16 * 4 * 4  # K and V (L, b, kv, T, hd)


def _closed_over(jaxpr):
    """Shapes of the arrays a jaxpr holds as constants (closed over, or literals), its sub-jaxprs included."""
    return jaxpr_parts(jaxpr)[1]


@pytest.mark.parametrize("mode", ["base", "unmerged", "mixed8", "mixed64_of1024", "train_one", "train_stack8"])
def test_multi_adapter_steps_take_the_weights_as_arguments(mode):
    """Issue 11: a step that closed over the base params embedded them in the program (16 GB for the
    8B), so the unmerged and mixed modes compiled for minutes. Every array must be an argument."""
    import jax

    from benchmarks import multi_adapter

    a = argparse.Namespace(config="tiny", mode=mode, rank=4, lora_dtype="float32", decode_batch=4, prefill_batch=2,
                           cache=16, override="{}")  # fmt: skip
    fn, args, _, _, info = multi_adapter._program(a)
    assert _closed_over(jax.make_jaxpr(fn)(*args)) == []
    hlo = jax.jit(fn).lower(*args).as_text()
    assert len(hlo) < info["weight_bytes"] / 2, (len(hlo), info["weight_bytes"])  # the weights are not in the text


def test_multi_adapter_driver_records_timeouts_and_skips_in_the_json(tmp_path, capsys):
    from benchmarks import multi_adapter

    path = tmp_path / "m.json"
    flags = ["--config", "tiny", "--modes", "base,mixed8", "--out", str(path)]
    multi_adapter.main([*flags, "--timeout", "0.05"])  # no worker can even import JAX in that time
    modes = json.loads(path.read_text())["modes"]
    assert {k: v["error"] for k, v in modes.items()} == {"base": "timeout", "mixed8": "timeout"}
    multi_adapter.main([*flags, "--budget", "1"])  # no time left for any mode: each is recorded as skipped
    modes = json.loads(path.read_text())["modes"]
    assert {k: v["error"] for k, v in modes.items()} == {"base": "skipped", "mixed8": "skipped"}
    assert "base: timeout" in capsys.readouterr().out


@pytest.mark.parametrize("cache_form", ["xs", "carry"])
def test_the_decode_model_decodes_what_a_prefill_computes(cache_form):
    """The benchmarks' KV-cache decoder, each way of reaching the cache: a prefill of 5 tokens, then
    3 one-token steps, then 3 tokens at once on the prefilled cache give the logits and the cache of
    one pass over the 8 tokens."""
    import jax

    from benchmarks import models, multi_adapter

    cfg = models.configure("tiny")
    max_len, b = 8, 2
    tokens = jax.random.randint(jax.random.key(0), (b, max_len), 0, cfg.vocab)
    empty = multi_adapter.empty_cache(cfg, b, max_len)
    fresh = multi_adapter._model(cfg, max_len, fresh=True, cache_form=cache_form)
    step = multi_adapter._model(cfg, max_len, cache_form=cache_form)
    params = fresh.init(jax.random.key(1), tokens, empty, 0)
    want, want_cache = fresh.apply(params, tokens, empty, 0)
    _, prefilled = fresh.apply(params, tokens[:, :5], empty, 0)
    cache = prefilled
    for pos in range(5, max_len):
        got, cache = jax.jit(step.apply)(params, tokens[:, pos : pos + 1], cache, pos)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(cache, want_cache, rtol=2e-5, atol=2e-5)
    chunk, _ = step.apply(params, tokens[:, 5:], prefilled, 5)
    np.testing.assert_allclose(chunk, want, rtol=2e-5, atol=2e-5)


def test_train_step_rejects_an_unknown_policy():
    from benchmarks import models

    with pytest.raises(ValueError, match=r"remat policy 'all': expected one of \('block', 'none'"):
        models.configure("tiny_scan", policy="all")


def test_overrides_may_unroll_a_scanned_config():
    """``--override '{"scan": false}'`` unrolls the layers of a config that scans them (the 8B's unrolled rows)."""
    from benchmarks import models

    assert models.configure("tiny_scan").scan and not models.configure("tiny_scan", override='{"scan": false}').scan
    assert models.configure("tiny", scan=True, override='{"n_layers": 1}').scan


def test_model_flops_count_the_lora_products():
    """Full fine-tuning 6·N·tokens, LoRA 4·N·tokens plus 6·tokens·r·(in + out) per adapted matrix, both plus
    attention; MFU against 989 TFLOP/s where the backend is a GPU."""
    from benchmarks import models

    cfg = models.configure("tiny")  # d 64, ff 256, 2 layers, 2 x 32 tokens
    tokens, attention = 64, 6.0 * 2 * 32 * 64 * 64
    assert train_step.model_flops(cfg, "torch_full_ckpt", 4, ()) == 6.0 * cfg.matmul_params() * tokens + attention
    assert train_step.model_flops(cfg, "lora", 4, ()) == 4.0 * cfg.matmul_params() * tokens + attention
    up = train_step.model_flops(cfg, "peft", 4, ("up",)) - train_step.model_flops(cfg, "peft", 4, ())
    assert up == 2 * 6.0 * tokens * 4 * (64 + 256)  # two layers
    assert train_step.model_flops(cfg, "frozen", 4, ()) is None
    result = {"backend": "gpu", "modes": {"lora": {"median_ms": 1.0}, "frozen": {"median_ms": 1.0}, "x": {}}}
    train_step._add_mfu(result, cfg, 4, ("up",))
    lora = result["modes"]["lora"]
    assert lora["achieved_tflops_per_s"] == pytest.approx(lora["model_tflops"] * 1e3)
    assert lora["mfu"] == pytest.approx(lora["achieved_tflops_per_s"] * 1e12 / 989e12)
    assert "mfu" not in result["modes"]["frozen"] and "mfu" not in result["modes"]["x"]


def test_torch_peer_checkpointing_and_bf16_adapters():
    pytest.importorskip("peft", reason="the PyTorch peer needs torch and peft (the peft extra)")
    out = train_step._worker(_args("peft_ckpt", lora_dtype="bfloat16", override='{"dtype": "bfloat16"}'))
    assert out["gradient_checkpointing"] and out["trainable_dtype"] == "bfloat16" and out["median_ms"] > 0
    out = train_step._worker(_args("peft", override='{"dtype": "bfloat16"}'))  # PEFT's default: float32 adapters
    assert not out["gradient_checkpointing"] and out["trainable_dtype"] == "float32"


@pytest.mark.slow
def test_driver_runs_lora_under_each_policy(tmp_path, capsys):
    """``--policy block,none,outputs``: each policy's LoRA step in its own process, labelled lora@policy, with
    its MFU; a policy, and no remat, train as whole-block remat does (tiny_scan: scan + remat)."""
    out = tmp_path / "r.json"
    train_step.main(["--config", "tiny_scan", "--modes", "lora", "--policy", "block,none,outputs", "--steps", "2",
                     "--warmup", "1", "--rank", "4", "--window", "2", "--out", str(out)])  # fmt: skip
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"lora@block", "lora@none", "lora@outputs"}, modes
    for p in ("none", "outputs"):
        assert modes[f"lora@{p}"]["loss"] == pytest.approx(modes["lora@block"]["loss"], rel=1e-5)
    assert all(r["model_tflops"] > 0 for r in modes.values())
    assert "model TFLOP/s (MFU of 989 TFLOP/s bf16): lora@block" in capsys.readouterr().out
