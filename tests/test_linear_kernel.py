"""fdkit's oneDNN linear kernel (fdkit/kernels/linear.cc): packed weights give x W within float32 rounding,
or within bf16 rounding in bf16, for odd shapes and any number of rows; the engine packs every linear
layer once and falls back to the programs where the kernel cannot be built."""

import logging

import numpy as np
import paddle
import pytest
from helpers import TEST_COMPILE_CACHE, TEST_ENGINE

from fdkit import LLM, SamplingParams, kernels
from fdkit.engine.memory import cpu_has_bfloat16
from fdkit.parallel import LINEAR_LAYERS

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def kernel():
    op = kernels.packed_linear(TEST_COMPILE_CACHE, num_threads=2)
    assert op is not None, "the kernel did not build"
    return op


# (in, out): the 0.3b preset's four matmuls and LM head, and shapes no kernel block divides
SHAPES = [(1024, 2560), (3072, 1024), (7, 5), (96, 300), (130, 66)]
ROWS = [1, 3, 31, 32, 33, 300]  # around the 32 rows the packed layout is chosen for


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_linear_equals_numpy(kernel, shape, bf16):
    """float32: within 1e-5 of the largest output; bf16 (x and W rounded to bf16, float32 sums): within
    1%, measured 0.2-0.3%."""
    if bf16 and not cpu_has_bfloat16():
        pytest.skip("this CPU has no avx512_bf16 / AMX")
    rng = np.random.default_rng(sum(shape))
    weight = rng.standard_normal(shape).astype(np.float32)
    packed = kernel.pack(paddle.to_tensor(weight), bf16)
    for num_rows in ROWS:
        x = rng.standard_normal((num_rows, shape[0])).astype(np.float32)
        want = x @ weight
        got = kernel(paddle.to_tensor(x), packed, shape[1], bf16).numpy()
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < (1e-2 if bf16 else 1e-5), (num_rows, error)


def test_leading_axes_zero_rows_and_threads(kernel):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 48)).astype(np.float32)
    packed = kernel.pack(paddle.to_tensor(weight), False)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    got = kernel(paddle.to_tensor(x), packed, 48, False)
    assert got.shape == [2, 5, 48]
    np.testing.assert_allclose(got.numpy(), x @ weight, atol=1e-4, rtol=0)
    assert kernel(paddle.zeros([0, 64]), packed, 48, False).shape == [0, 48]
    one_thread = kernels.PackedLinear(kernel.module, num_threads=1)
    alone = one_thread(paddle.to_tensor(x), packed, 48, False)
    np.testing.assert_allclose(alone.numpy(), got.numpy(), atol=1e-5)


def test_a_packed_weight_of_another_size_is_refused(kernel):
    """The packed bytes carry no shape: their size is checked (a layout may pad, so some shapes share it)."""
    packed = kernel.pack(paddle.ones([64, 48]), False)
    with pytest.raises(Exception, match="does not match"):
        kernel(paddle.ones([2, 32]), packed, 48, False)


def test_the_engine_packs_every_linear_layer_once(tiny_pt):
    with LLM(tiny_pt, **TEST_ENGINE) as llm:
        runner = llm.engine.runner
        assert runner.compiled.predictors == {}  # no dense programs
        linears = [layer for layer in runner.model.sublayers() if isinstance(layer, LINEAR_LAYERS)]
        assert linears
        assert all(layer.weight is None and layer.packed.dtype == paddle.uint8 for layer in linears)
        assert llm.generate(["hello"], GREEDY, use_tqdm=False)[0].token_ids


def test_without_the_kernel_the_programs_hold_the_only_weights(tiny_pt, monkeypatch, tmp_path, caplog):
    """No compiler: the dense parts run as programs, which hold the only copy (the memory plan counted
    one), and give the same greedy tokens."""
    with LLM(tiny_pt, **TEST_ENGINE) as llm:
        expected = llm.generate(["hello", "x"], GREEDY, use_tqdm=False)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("cc: command not found")

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr("paddle.utils.cpp_extension.load", no_compiler)
    engine = {**TEST_ENGINE, "compile_cache_dir": str(tmp_path)}
    with caplog.at_level(logging.WARNING, logger="fdkit.kernels"), LLM(tiny_pt, **engine) as llm:
        compiled = llm.engine.runner.compiled
        assert compiled.predictors and compiled.min_tokens == 1
        got = llm.generate(["hello", "x"], GREEDY, use_tqdm=False)
    assert "could not be built" in caplog.text
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
