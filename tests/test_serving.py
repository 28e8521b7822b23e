"""`AdapterCache` (an LRU of device slots fed from host memory or disk) and `serving_compiler_options`."""

import argparse
import dataclasses
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = {"n": 0}
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _compiles.__setitem__("n", _compiles["n"] + (event == _COMPILE_EVENT))
)


def _random(lora, seed):
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(lora)))
    return {
        p: dataclasses.replace(
            f, a=jax.random.normal(next(keys), f.a.shape), b=jax.random.normal(next(keys), f.b.shape)
        )
        for p, f in lora.items()
    }


PARAMS = {
    "w": np.asarray(jax.random.normal(jax.random.key(0), (4, 6))),
    "v": np.asarray(jax.random.normal(jax.random.key(1), (6, 3))),
}


def fn(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


def _adapters(n=5):
    """``n`` adapters of other ranks, alphas and targets."""
    targets = ("all-linear", "w", "v")
    configs = [jaxlora.LoraConfig(rank=1 + k % 3, alpha=1.0 + k, targets=targets[k % 3]) for k in range(n)]
    return {f"a{k}": _random(jaxlora.init(jax.random.key(k), PARAMS, c), 100 + k) for k, c in enumerate(configs)}


def _reference(lora, x):
    """NumPy: ``x`` through ``fn`` with ``lora`` merged (``None``: the base)."""
    w = {p: np.asarray(v, np.float64) for p, v in PARAMS.items()}
    for p, f in (lora or {}).items():
        w[p] = w[p] + f.scale * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
    return np.tanh(np.asarray(x, np.float64) @ w["w"]) @ w["v"]


def _check_batch(cache, adapters, names, x, serve):
    ids = cache.ids(names)
    got = np.asarray(serve(PARAMS, cache.stack, x, ids))
    for row, n in enumerate(names):
        want = _reference(None if n is None else adapters[n], x[row : row + 1])[0]
        np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-4, err_msg=f"row {row}, adapter {n}")
    return ids


def test_lru_loads_misses_evicts_the_least_recently_used_and_serves_each_row_its_adapter():
    adapters = _adapters(5)
    host = {n: jax.device_get(lora) for n, lora in adapters.items()}  # numpy trees
    cache = jaxlora.AdapterCache(host, max_loras=3)
    assert cache.stack.slots == 3 and cache.stack.folded and cache.stack.a["w"].shape == (4, 3, 3)
    serve = jax.jit(lambda p, s, x, i: jaxlora.apply(fn, p, s, x, adapter_ids=i))
    x = np.asarray(jax.random.normal(jax.random.key(7), (4, 4)))
    ids = _check_batch(cache, adapters, ["a0", None, "a1", "a0"], x, serve)
    assert ids.tolist() == [0, -1, 1, 0] and ids.dtype == np.int32 and cache.loads == 2
    _check_batch(cache, adapters, ["a2", "a1", "a1", "a2"], x, serve)  # fills slot 2; a0 now least recent
    assert cache.resident == {"a0": 0, "a1": 1, "a2": 2} and cache.loads == 3
    ids = _check_batch(cache, adapters, ["a3", "a2", None, "a3"], x, serve)  # evicts a0, never a2
    assert ids.tolist() == [0, 2, -1, 0] and list(cache.resident) == ["a1", "a2", "a3"] and cache.loads == 4
    _check_batch(cache, adapters, ["a4", "a0", "a3", "a4"], x, serve)  # two misses: evict a1 then a2
    assert set(cache.resident) == {"a3", "a4", "a0"} and cache.loads == 6
    _check_batch(cache, adapters, ["a0", "a3", "a4", None], x, serve)  # all hits
    assert cache.loads == 6


def test_adapters_coming_and_going_never_recompile():
    adapters = _adapters(6)
    cache = jaxlora.AdapterCache(adapters, max_loras=2, rank=4)
    serve = jax.jit(lambda p, s, x, i: jaxlora.apply(fn, p, s, x, adapter_ids=i))
    x = np.asarray(jax.random.normal(jax.random.key(7), (3, 4)))
    _check_batch(cache, adapters, ["a0", "a1", None], x, serve)  # compiles serve and the slot writer
    n0 = _compiles["n"]
    for k in range(2, 6):  # every swap: other ranks, alphas, targets, slots
        _check_batch(cache, adapters, [f"a{k}", None, f"a{k - 1}"], x, serve)
    assert _compiles["n"] == n0 and serve._cache_size() == 1
    assert cache.loads == 6


def test_a_written_slot_equals_stack_set_on_a_folded_stack_bit_for_bit():
    adapters = _adapters(3)
    for dtype in (jnp.bfloat16,):  # float32: exact by the numerics tests
        cache = jaxlora.AdapterCache(adapters, max_loras=3, rank=4, dtype=dtype)
        cache.ids(["a2", "a0", "a1"])
        want = jaxlora.stack({"a2": adapters["a2"], "a0": adapters["a0"], "a1": adapters["a1"]}, rank=4,
                             dtype=dtype, fold_scales=True)  # fmt: skip
        for p in want.paths:
            np.testing.assert_array_equal(np.asarray(cache.stack.a[p]), np.asarray(want.a[p]))
            np.testing.assert_array_equal(np.asarray(cache.stack.b[p]), np.asarray(want.b[p]))
            assert cache.stack.a[p].dtype == dtype
        cache.ids(["a1"])
        cache.add("new", adapters["a0"])
        cache.ids(["new"])  # evicts a2 from slot 0: the old slot's values fully overwritten
        want = jaxlora.stack_set(want, "a2", adapters["a0"])
        for p in want.paths:
            np.testing.assert_array_equal(np.asarray(cache.stack.b[p]), np.asarray(want.b[p]))


def test_a_float64_slot_equals_stack_set_bit_for_bit():
    rng = np.random.default_rng(0)
    lora = {"w": jaxlora.LoraFactors(a=rng.normal(size=(4, 3)), b=rng.normal(size=(3, 6)), scale=7.3 / 3, roles="io")}
    with jax.enable_x64(True):  # the scale was rounded to float32 before it multiplied a float64 b
        cache = jaxlora.AdapterCache({"x": lora}, max_loras=1)
        cache.ids(["x"])
        want = jaxlora.stack({"x": lora}, fold_scales=True)
        assert cache.stack.b["w"].dtype == np.float64
        np.testing.assert_array_equal(np.asarray(cache.stack.b["w"]), np.asarray(want.b["w"]))


def test_adapters_from_checkpoint_directories_load_on_demand(tmp_path):
    adapters = _adapters(3)
    paths = {n: jaxlora.checkpoint.save(tmp_path / n, lora) for n, lora in adapters.items()}
    cache = jaxlora.AdapterCache({"a0": paths["a0"], "a1": str(paths["a1"])}, max_loras=1, rank=3)
    cache.add("a2", adapters["a2"])  # a host tree beside directories
    serve = jax.jit(lambda p, s, x, i: jaxlora.apply(fn, p, s, x, adapter_ids=i))
    x = np.asarray(jax.random.normal(jax.random.key(7), (2, 4)))
    for names in (["a0", None], ["a1", "a1"], ["a2", None], ["a0", "a0"]):
        _check_batch(cache, adapters, names, x, serve)
    assert cache.loads == 4


def test_swap_cost_is_measured(capsys):
    params = {f"w{i}": np.zeros((256, 256), np.float32) for i in range(8)}
    adapters = {
        f"a{k}": jax.device_get(_random(jaxlora.init(jax.random.key(k), params, jaxlora.LoraConfig(rank=16)), k))
        for k in range(3)
    }
    cache = jaxlora.AdapterCache(adapters, max_loras=2)
    cache.ids(["a0", "a1"])
    jax.block_until_ready(cache.stack)
    times = []
    for k in range(6):  # each a miss: a2 evicts a0, a0 evicts a1, ...
        t0 = time.perf_counter()
        cache.ids([f"a{(k + 2) % 3}"])
        jax.block_until_ready(cache.stack)
        times.append(time.perf_counter() - t0)
    assert cache.loads == 8
    mb = sum(x.nbytes for x in jax.tree.leaves(adapters["a0"])) / 1e6
    with capsys.disabled():
        print(f"\nAdapterCache swap on the CPU: {1e3 * np.median(times):.2f} ms for {mb:.2f} MB of factors")
    assert list(cache.resident) == ["a0", "a1"]
    for n, slot in cache.resident.items():  # the last writes hold what was written
        np.testing.assert_array_equal(cache.stack.a["w3"][:, slot], adapters[n]["w3"].a)


def test_errors():
    adapters = _adapters(3)
    with pytest.raises(ValueError, match=r"max_loras=0: expected an int, at least 1"):
        jaxlora.AdapterCache(adapters, max_loras=0)
    with pytest.raises(ValueError, match=r"max_loras=True: expected an int.*\n  rank=2.5: expected an int"):
        jaxlora.AdapterCache(adapters, max_loras=True, rank=2.5)
    cache = jaxlora.AdapterCache(adapters, max_loras=np.int64(2), rank=np.int32(3))  # NumPy ints are ints
    assert cache.max_loras == 2 and type(cache.max_loras) is int and cache.stack.slot_rank("w") == 3
    with pytest.raises(ValueError, match="no adapters given"):
        jaxlora.AdapterCache({}, max_loras=2)
    with pytest.raises(TypeError, match=r"adapters must be a dict \{name: lora or directory\}, got list"):
        jaxlora.AdapterCache([adapters["a0"]], max_loras=2)
    with pytest.raises(TypeError, match=r"adapters \{'x': 'int'\}"):
        jaxlora.AdapterCache({"x": 3}, max_loras=2)
    with pytest.raises(ValueError, match=r"rank 3 > rank=2; pass a larger rank="):
        jaxlora.AdapterCache(adapters, max_loras=2, rank=2)
    other = {"w": dataclasses.replace(adapters["a0"]["w"], a=jnp.ones((5, 1)), roles="io")}
    with pytest.raises(ValueError, match=r"'w': adapter 'b' was made for another weight"):
        jaxlora.AdapterCache({"a": adapters["a0"], "b": other}, max_loras=2)
    dora = jaxlora.init(jax.random.key(0), PARAMS, jaxlora.LoraConfig(rank=1, dora=True))
    with pytest.raises(ValueError, match="DoRA modules"):
        jaxlora.AdapterCache({"d": dora}, max_loras=2)
    with pytest.raises(ValueError, match=r"adapter 'gone': .* cannot be read"):
        jaxlora.AdapterCache({"gone": "/nonexistent/adapter"}, max_loras=2)

    cache = jaxlora.AdapterCache({"a1": adapters["a1"]}, max_loras=2)  # rank 2, module w alone
    with pytest.raises(ValueError, match=r"'v': the cache's stack has no such module.*\nFix: make the cache"):
        cache.add("a0", adapters["a0"])
    with pytest.raises(ValueError, match=r"'w': rank 3 > the slot rank 2"):
        cache.add("a2", jaxlora.init(jax.random.key(0), PARAMS, jaxlora.LoraConfig(rank=3, targets="w")))
    with pytest.raises(ValueError, match="'a1' is already registered"):
        cache.add("a1", adapters["a1"])
    with pytest.raises(TypeError, match="expected a LoRA tree or a checkpoint directory"):
        cache.add("x", [1, 2])
    cache.add("b", adapters["a1"])
    cache.add("c", adapters["a1"])
    with pytest.raises(ValueError, match=r"unknown adapters \['a11'\] \(closest registered: \{'a11': \['a1'\]"):
        cache.ids(["a1", "a11"])
    with pytest.raises(ValueError, match="names 3 distinct adapters but the cache has max_loras=2"):
        cache.ids(["a1", "b", "c", "b"])
    assert cache.loads == 0 and cache.resident == {}  # a refused batch loads nothing


def test_a_failed_read_leaves_the_cache_as_it_was(tmp_path):
    adapters = _adapters(2)
    path = jaxlora.checkpoint.save(tmp_path / "a0", adapters["a0"])
    cache = jaxlora.AdapterCache({"a0": path, "a1": adapters["a1"]}, max_loras=1, rank=3)
    cache.ids(["a1"])
    arrays = [p for p in path.rglob("*") if p.is_file() and "manifest" not in p.name and p.stat().st_size > 64]
    arrays[0].write_bytes(b"\0" * arrays[0].stat().st_size)  # damaged on disk after the cache took it
    with pytest.raises(jaxlora.checkpoint.CorruptCheckpointError, match="is damaged"):
        cache.ids(["a0"])
    assert cache.resident == {"a1": 0} and cache.loads == 1
    x = np.asarray(jax.random.normal(jax.random.key(7), (1, 4)))
    _check_batch(cache, adapters, ["a1"], x, jax.jit(lambda p, s, x, i: jaxlora.apply(fn, p, s, x, adapter_ids=i)))


def test_a_directory_that_changed_on_disk_is_refused_at_load_and_the_cache_stays_as_it_was(tmp_path):
    adapters = _adapters(3)  # a1 adapts w alone at rank 2; a0 adapts w and v at rank 1; a2 v at rank 3
    dora = jaxlora.init(jax.random.key(0), PARAMS, jaxlora.LoraConfig(rank=1, targets="w", dora=True))
    rank3 = jaxlora.init(jax.random.key(0), PARAMS, jaxlora.LoraConfig(rank=3, targets="w"))
    x = np.asarray(jax.random.normal(jax.random.key(7), (1, 4)))
    serve = jax.jit(lambda p, s, x, i: jaxlora.apply(fn, p, s, x, adapter_ids=i))
    for k, (other, problem) in enumerate([
        (adapters["a0"], r"'v': the cache's stack has no such module"),  # served without v, before
        (rank3, r"'w': rank 3 > the slot rank 2"),  # a slot lost to a failed write, before
        (dora, r"DoRA modules \['w'\] cannot be stacked"),  # served without its magnitude, before
    ]):  # fmt: skip
        path = jaxlora.checkpoint.save(tmp_path / f"d{k}", adapters["a1"])
        cache = jaxlora.AdapterCache({"d": path, "a1": adapters["a1"]}, max_loras=1)
        cache.ids(["a1"])
        shutil.rmtree(path)
        jaxlora.checkpoint.save(path, other)  # another adapter under the registered directory
        with pytest.raises(ValueError, match=rf"(?s)adapter 'd' at .*d{k} no longer fits.*{problem}.*Fix: save"):
            cache.ids(["d"])
        assert cache.resident == {"a1": 0} and cache.loads == 1
        _check_batch(cache, adapters, ["a1"], x, serve)


def test_numpy_arrays_the_caller_writes_after_registering_never_reach_the_adapter():
    adapters = _adapters(2)
    mine = {n: {p: dataclasses.replace(f, a=np.array(f.a), b=np.array(f.b)) for p, f in lora.items()}
            for n, lora in adapters.items()}  # fmt: skip
    cache = jaxlora.AdapterCache({"a0": mine["a0"]}, max_loras=1, rank=2)
    cache.add("a1", mine["a1"])
    for lora in mine.values():  # the caller reuses its buffers (the next round of training, a torch tensor's memory)
        for f in lora.values():
            f.a[...], f.b[...] = 5.0, -5.0
    x = np.asarray(jax.random.normal(jax.random.key(7), (1, 4)))
    serve = jax.jit(lambda p, s, x, i: jaxlora.apply(fn, p, s, x, adapter_ids=i))
    for names in (["a0"], ["a1"], ["a0"]):  # loaded, evicted and loaded again: the registered values each time
        _check_batch(cache, adapters, names, x, serve)


def test_serving_compiler_options_name_an_option_this_xla_accepts():
    assert jaxlora.serving_compiler_options("cpu") == {} and jaxlora.serving_compiler_options("tpu") == {}
    options = jaxlora.serving_compiler_options("gpu")
    assert options == {"xla_gpu_enable_triton_gemm": False}
    # XLA checks each name against its debug options on every platform: a misspelt option raises here
    step = jax.jit(lambda w, x: x @ w, compiler_options=options)
    np.testing.assert_allclose(step(jnp.eye(3), jnp.ones((2, 3))), np.ones((2, 3)))
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_enable_triton_gemmm": False})(1.0)


@pytest.mark.parametrize("mode", ["swap", "base_b1"])
def test_the_benchmark_measures_swaps_and_merged_decode_at_batch_1(mode):
    from benchmarks import multi_adapter

    a = argparse.Namespace(config="tiny", mode=mode, rank=4, lora_dtype="float32", decode_batch=4, prefill_batch=2,
                           cache=16, steps=2, warmup=1, override="{}", gemm="flags")  # fmt: skip
    out = multi_adapter._worker(a)
    assert out["median_ms"] > 0 and out["compiler_options"] == {}
    if mode == "swap":  # tiny: 2 layers of q, k, v, o, up, down (d 64, ff 256), rank 4, float32
        assert out["adapter_bytes"] == 4 * 4 * 2 * (4 * (64 + 64) + 2 * (64 + 256)) and out["disk_median_ms"] > 0
    else:
        assert out["batch"] == 1 and out["kv_bytes"] == 2 * 2 * 1 * 4 * 16 * 16 * 4 and out["copy_gb_per_s"] > 0
