"""Merged exports (save_merged, merge_safetensors, the CLI's merge): quantized bases merge to float weights,
every dtype safetensors holds round-trips, and what cannot be merged is refused by name."""

import dataclasses
import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import jaxlora
from jaxlora import checkpoint as ckpt
from jaxlora.__main__ import main
from jaxlora.checkpoint._merged import write_safetensors

# safetensors code -> numpy dtype, for every code that has a numpy array type
NUMPY_CODES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "C64": np.complex64, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
    "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _random_bits(rng, shape, dtype):
    """An array of ``dtype`` holding random bit patterns (NaNs and all): round trips must keep every bit."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 256, (*shape, dtype.itemsize), dtype=np.uint8).view(dtype).reshape(shape)


def _read_bytes(path, key):
    """The tensor ``key`` of a safetensors file as raw bytes, read by safetensors itself (torch for float8)."""
    with safe_open(str(path), framework="numpy") as f:
        code = f.get_slice(key).get_dtype()
        if not code.startswith("F8"):
            return np.ascontiguousarray(f.get_tensor(key)).tobytes()
    torch = pytest.importorskip("torch")
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).view(torch.uint8).numpy().tobytes()


def _base():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "params": {
            "fc": {"kernel": jax.random.normal(k[0], (64, 128)), "bias": jnp.arange(128.0)},
            "out": {"kernel": jax.random.normal(k[1], (128, 64))},
        }
    }


def _lora(params, targets="fc"):
    lora = jaxlora.init(jax.random.key(3), params, jaxlora.LoraConfig(rank=4, targets=targets))
    return {p: dataclasses.replace(f, b=jax.random.normal(jax.random.key(4), f.b.shape)) for p, f in lora.items()}


def _flat(tree):
    return {"/".join(str(k.key) for k in kp[1:]): np.asarray(x) for kp, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("fmt,double_quant", [("int8", False), ("nf4", False), ("nf4", True)])
def test_save_merged_quantized_base_writes_float_weights(tmp_path, fmt, double_quant):
    params = _base()
    q = jaxlora.quantize(params, fmt, double_quant=double_quant)
    lora = _lora(params)
    want = _flat(jaxlora.merge(jaxlora.dequantize(q), lora))
    got = load_file(ckpt.save_merged(tmp_path / "m.safetensors", q, lora))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    out = ckpt.save_merged(tmp_path / "orbax", q, lora, format="orbax").absolute()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), jaxlora.dequantize(q))
    back = _flat(ocp.v1.load(out, abstract))
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    # dtype= casts the merged and the dequantized weights, as jaxlora.merge(..., dtype=) does
    got = load_file(ckpt.save_merged(tmp_path / "bf16.safetensors", q, lora, dtype=jnp.bfloat16))
    want = _flat(jaxlora.merge(q, lora, dtype=jnp.bfloat16))
    assert {k: str(v.dtype) for k, v in got.items()} == {
        "fc/bias": "float32", "fc/kernel": "bfloat16", "out/kernel": "bfloat16"
    }  # fmt: skip
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_save_merged_quantized_bfloat16_base_keeps_its_dtype(tmp_path):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _base())
    q = jaxlora.quantize(params, "nf4")
    lora = _lora(params)
    got = load_file(ckpt.save_merged(tmp_path / "m.safetensors", q, lora))
    want = _flat(jaxlora.merge(q, lora, dtype=jnp.bfloat16))
    for k in want:
        assert got[k].dtype == want[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_save_merged_writes_modules_to_save(tmp_path):
    params = _base()
    config = jaxlora.LoraConfig(rank=2, targets="fc", modules_to_save=["out"])
    lora = jaxlora.init(jax.random.key(0), params, config)
    lora["out"] = jax.tree.map(lambda x: x + 1.0, lora["out"])  # trained: no longer the base's copy
    got = load_file(ckpt.save_merged(tmp_path / "m.safetensors", params, lora))
    want = _flat(jaxlora.merge(params, lora))
    np.testing.assert_array_equal(got["out/kernel"], np.asarray(params["params"]["out"]["kernel"]) + 1.0)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_save_merged_every_dtype_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    untouched = {code: _random_bits(rng, (3, 5), dtype) for code, dtype in NUMPY_CODES.items()}
    adapted = {code: rng.normal(size=(8, 6)).astype(NUMPY_CODES[code]) for code in ("F32", "F16", "BF16", "F8_E4M3")}
    params = {f"keep_{c}": x for c, x in untouched.items()} | {f"lin_{c}": {"kernel": x} for c, x in adapted.items()}
    lora = _lora(params, targets="lin_.*")
    out = ckpt.save_merged(tmp_path / "m.safetensors", params, lora)
    for code, x in untouched.items():
        with safe_open(str(out), framework="numpy") as f:
            assert f.get_slice(f"keep_{code}").get_dtype() == code
        assert _read_bytes(out, f"keep_{code}") == x.tobytes(), code
    merged = jaxlora.merge(params, lora)
    for code, x in adapted.items():
        got = np.frombuffer(_read_bytes(out, f"lin_{code}/kernel"), x.dtype).reshape(x.shape)
        assert got.tobytes() == np.asarray(merged[f"lin_{code}"]["kernel"]).tobytes(), code
        f = lora[f"lin_{code}"]  # and jaxlora.merge is W + scale·a·b, rounded once to W's dtype
        want = (x.astype(np.float32) + f.scale * np.asarray(f.a) @ np.asarray(f.b)).astype(x.dtype)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0.07, atol=1e-6)


def test_save_merged_refuses_dtypes_safetensors_lacks(tmp_path):
    params = {"fc": {"kernel": jnp.ones((4, 6))}, "codes": jnp.zeros((4,), jnp.int4), "c": np.zeros(2, np.complex128)}
    with pytest.raises(ValueError, match=r"(?s)no dtype for these tensors.*'c': complex128.*'codes': int4.*cast"):
        ckpt.save_merged(tmp_path / "m.safetensors", params, _lora(params))
    assert not (tmp_path / "m.safetensors").exists()


def _raw_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return header, {k: data[slice(*v["data_offsets"])] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("code", ["F32", "BF16", "F16", "F8_E4M3"])
def test_merge_safetensors_every_dtype_round_trips(tmp_path, code):
    """Unadapted tensors of every dtype (the sub-byte F4 and F6 too) are copied bit for bit; the adapted
    weight gets PEFT's ΔW in float32, cast back to its dtype."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 4)).astype(NUMPY_CODES[code])  # torch layout (out, in)
    arrays = {f"keep.{c}": _random_bits(rng, (3, 4), dtype) for c, dtype in NUMPY_CODES.items()} | {"fc.weight": w}
    packed = {"keep.F4": ("F4", (3, 4), rng.bytes(6)), "keep.F6_E2M3": ("F6_E2M3", (4, 4), rng.bytes(12))}
    entries = [(k, x.shape, x.dtype) for k, x in arrays.items()] + [(k, s, c) for k, (c, s, _) in packed.items()]
    data = list(arrays.values()) + [b for _, _, b in packed.values()]
    write_safetensors(tmp_path / "base.safetensors", entries, data.__getitem__, metadata={"format": "pt"})
    params = {"fc": {"weight": jnp.zeros((6, 4))}}
    lora = _lora(params)
    ckpt.save_peft(tmp_path / "adapter", lora, params=params)
    out = ckpt.merge_safetensors(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "m.safetensors")
    with safe_open(str(out), framework="numpy") as f:  # safetensors accepts the file
        assert sorted(f.keys()) == sorted(k for k, *_ in entries)
    for k, x in arrays.items():
        if k != "fc.weight":
            assert _read_bytes(out, k) == x.tobytes(), k
    header, raw = _raw_header(out)
    base_header, base_raw = _raw_header(tmp_path / "base.safetensors")
    for k in packed:
        assert header[k]["dtype"] == base_header[k]["dtype"] and raw[k] == base_raw[k], k
    f = lora["fc"]
    delta = f.scale * (np.asarray(f.a, np.float32) @ np.asarray(f.b, np.float32)).T  # roles "oi": a (in, r)
    want = (w.astype(np.float32) + delta).astype(w.dtype)
    got = np.frombuffer(_read_bytes(out, "fc.weight"), w.dtype).reshape(w.shape)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0.07, atol=1e-6)
    if code != "F8_E4M3":  # bit for bit where float32's rounding of the sum cannot differ
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


def test_merge_safetensors_refuses_a_quantized_base(tmp_path):
    write_safetensors(
        tmp_path / "base.safetensors", [("fc.weight", (6, 4), np.uint8)], lambda i: np.zeros((6, 4), np.uint8)
    )
    params = {"fc": {"weight": jnp.zeros((6, 4))}}
    ckpt.save_peft(tmp_path / "adapter", _lora(params), params=params)
    with pytest.raises(ValueError, match=r"'fc.weight': the base tensor is U8, not a float weight.*quantized"):
        ckpt.merge_safetensors(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "m.safetensors")


def test_cli_merges_a_bfloat16_base(tmp_path, capsys):
    w = np.random.default_rng(2).normal(size=(6, 4)).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "base.safetensors", [("fc.weight", w.shape, w.dtype)], lambda i: w)
    params = {"fc": {"weight": jnp.zeros((6, 4))}}
    lora = _lora(params)
    ckpt.save_peft(tmp_path / "adapter", lora, params=params)
    base, out = str(tmp_path / "base.safetensors"), str(tmp_path / "m.safetensors")
    assert main(["merge", base, str(tmp_path / "adapter"), out]) == 0
    got = load_file(out)["fc.weight"]
    f = lora["fc"]
    want = (w.astype(np.float32) + f.scale * (np.asarray(f.a) @ np.asarray(f.b)).T).astype(ml_dtypes.bfloat16)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    # an adapter argument that is a base: the message names the adapter's kind, not the base's
    assert main(["merge", base, out, str(tmp_path / "x")]) == 1
    assert f"{out} is not an adapter (found a safetensors file);" in capsys.readouterr().err


def test_merge_safetensors_unreadable_base_named(tmp_path):
    params = {"fc": {"weight": jnp.zeros((6, 4))}}
    ckpt.save_peft(tmp_path / "adapter", _lora(params), params=params)
    with pytest.raises(FileNotFoundError, match="The base .*none.safetensors does not exist"):
        ckpt.merge_safetensors(tmp_path / "none.safetensors", tmp_path / "adapter", tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" + bytes(7) + b"{garbage}")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        ckpt.merge_safetensors(tmp_path / "bad.safetensors", tmp_path / "adapter", tmp_path / "m.safetensors")


def test_cli_on_a_quantized_base_restored_without_its_nodes_says_how(tmp_path, capsys):
    params = _base()
    q = jaxlora.quantize(params, "nf4")
    with ocp.StandardCheckpointer() as c:
        c.save((tmp_path / "base").absolute(), q)
    ckpt.save(tmp_path / "adapter", _lora(q), params=q)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "m.safetensors")]) == 1
    assert "'fc': missing from params; params has no adaptable weight (it was a nf4-quantized weight" in (
        capsys.readouterr().err
    )


def test_cli_names_file_that_is_not_json(tmp_path, capsys):
    (tmp_path / "names.json").write_text("{oops")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "b.safetensors").write_bytes(b"")
    args = [str(tmp_path / "b.safetensors"), str(tmp_path / "adapter"), str(tmp_path / "o")]
    assert main(["merge", *args, "--names", str(tmp_path / "names.json")]) == 1
    assert "names.json': cannot read a JSON object {regex: replacement} from it (Expecting" in capsys.readouterr().err


@pytest.mark.parametrize("dora", [False, True])
def test_merge_safetensors_fan_in_fan_out(tmp_path, dora):
    """GPT-2's Conv1D stores its weight (in, out); PEFT then writes fan_in_fan_out=true and merges
    W + scale·(B·A)ᵀ. A square weight must not take the delta untransposed (its shape cannot tell)."""
    import safetensors.numpy

    rng = np.random.default_rng(0)
    base = {"h.0.attn.c_proj.weight": rng.normal(size=(6, 6)), "h.0.mlp.c_fc.weight": rng.normal(size=(6, 10))}
    base = {k: v.astype(np.float32) for k, v in base.items()}  # (in, out), as Conv1D holds them
    safetensors.numpy.save_file(base, str(tmp_path / "base.safetensors"))
    adapter, tensors, want = tmp_path / "adapter", {}, {}
    for name, w in base.items():
        module = name.removesuffix(".weight")
        A, B = rng.normal(size=(2, w.shape[0])), rng.normal(size=(w.shape[1], 2))  # (r, in), (out, r)
        tensors |= {f"base_model.model.{module}.lora_A.weight": A, f"base_model.model.{module}.lora_B.weight": B}
        d = w.T + 2.0 * B @ A  # PEFT's math, in the (out, in) orientation: transpose(W), then back
        if dora:
            m = rng.uniform(1, 2, size=w.shape[1])
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = m
            d = d * (m / np.linalg.norm(d, axis=1))[:, None]
        want[name] = d.T
    adapter.mkdir()
    safetensors.numpy.save_file(
        {k: v.astype(np.float32) for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors")
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_proj", "c_fc"],
              "fan_in_fan_out": True, "use_dora": dora, "bias": "none", "init_lora_weights": True}  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = ckpt.merge_safetensors(tmp_path / "base.safetensors", adapter, tmp_path / "m.safetensors")
    got = load_file(str(out))
    for name in base:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
