"""The triton attention core against the grid_sample reference: outputs and all three gradients.

Without a GPU the Triton programs run in Triton's interpreter, which ``@triton.jit`` chooses when
the module defining them is imported with ``TRITON_INTERPRET=1``: so this file, run as a script,
computes the differences under the interpreter in a child process (the suite's own imports stay
compiled), and the tests below check the numbers it reports. The CUDA tests run the compiled
programs where a device exists.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_backbone.detection.multiscale import sampling
from detr_backbone.detection.multiscale.sampling import multi_scale_deformable_attention, resolve_attention_impl
from detr_backbone.detection.multiscale.sampling.grid_sample import grid_sample_attention
from detr_backbone.detection.multiscale.sampling.triton_kernel import triton_attention, triton_usable

# name: (level shapes (h, w), batch, queries, heads, channels, points, dtype, where the points lie)
CASES = {
    "levels_1x1_and_9x13_batch_2": ([(1, 1), (9, 13)], 2, 5, 2, 3, 2, "float32", "around"),
    "levels_1x1_and_9x13_batch_2_float64": ([(1, 1), (9, 13)], 2, 5, 2, 3, 2, "float64", "around"),
    "outside_the_map": ([(4, 5), (2, 3)], 1, 6, 1, 4, 3, "float32", "outside"),
    "outside_the_map_float64": ([(4, 5), (2, 3)], 1, 6, 1, 4, 3, "float64", "outside"),
    "pixel_centres": ([(5, 9), (7, 10)], 1, 4, 2, 2, 3, "float32", "centres"),
    "bfloat16": ([(1, 1), (5, 7)], 1, 5, 2, 4, 2, "bfloat16", "around"),
    "float16": ([(1, 1), (5, 7)], 1, 5, 2, 4, 2, "float16", "around"),
    "small_float64": ([(2, 3), (1, 1)], 1, 2, 1, 2, 3, "float64", "outside"),  # few enough inputs for gradcheck
}
# largest difference from the reference, over the largest magnitude of the reference (or 1)
TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 2**-7, "float16": 2**-10}
GRADIENTS = ("value", "locations", "weights")


def case_inputs(name: str, device: str = "cpu", case: tuple | None = None) -> tuple[list, list[torch.Tensor]]:
    """(shapes, [value, locations, weights]) of the case ``name`` (or ``case`` under that name)."""
    shapes, batch, queries, heads, channels, points, dtype, where = case or CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    length, levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, length, heads, channels, generator=generator, dtype=torch.float64)
    unit = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
    if where == "around":  # mostly on the map, some within a pixel past its border
        locations = unit * 1.2 - 0.1
    elif where == "outside":  # every kind: far off, half a pixel past the border, on it, inside
        locations = unit * 3 - 1
        locations[..., 0, :] = torch.tensor([-7.0, 1.05])
        locations[..., 1, :] = torch.tensor([0.0, 1.0])
    else:  # the initial pattern's: a pixel centre plus whole pixels, summed in float32 as the model does
        sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]
        centres = ((unit * sizes).floor() + 0.5).float() / sizes
        steps = torch.randint(-2, 3, unit.shape, generator=generator).float()
        locations = (centres + steps / sizes).double()
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=torch.float64)
    return shapes, [t.to(device=device, dtype=getattr(torch, dtype)) for t in (value, locations, weights)]


def differences(core, name: str, device: str = "cpu", case: tuple | None = None) -> dict[str, float]:
    """max |core - reference| / max(1, max |reference|) for the output and the three gradients."""
    shapes, inputs = case_inputs(name, device, case)
    got = run_with_gradients(core, shapes, inputs)
    want = run_with_gradients(grid_sample_attention, shapes, inputs)
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(got, want))
    return {key: scaled_difference(a, b) for key, a, b in zip(("output", *GRADIENTS), got, want)}


def run_with_gradients(core, shapes, inputs, upstream_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The output and the gradients of value, locations and weights for a fixed random upstream gradient."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    output = core(leaves[0], shapes, leaves[1], leaves[2])
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    output.backward(upstream.to(upstream_dtype or output.dtype).to(output.dtype))
    return [output.detach(), *(leaf.grad for leaf in leaves)]


def scaled_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()


def interpreted_checks() -> dict:
    """Run under TRITON_INTERPRET=1: every case's differences, the half-precision rule and a gradcheck."""
    results = {name: differences(triton_attention, name) for name in CASES}
    for name in ("bfloat16", "float16"):  # the same numbers as float32 inputs, cast back
        shapes, low = case_inputs(name)
        got = run_with_gradients(triton_attention, shapes, low)
        in_float32 = run_with_gradients(triton_attention, shapes, [t.float() for t in low], low[0].dtype)
        results[name]["against_float32_inputs"] = max(
            scaled_difference(a, b.to(a.dtype)) for a, b in zip(got, in_float32)
        )
    shapes, inputs = case_inputs("small_float64")
    inputs = [t.requires_grad_() for t in inputs]
    results["gradcheck"] = torch.autograd.gradcheck(
        lambda v, loc, w: triton_attention(v, shapes, loc, w), inputs, eps=1e-6, atol=1e-7, raise_exception=False
    )
    results["interpreted"] = triton_usable("cpu")
    return results


@functools.cache
def interpreted_run() -> subprocess.CompletedProcess:
    """This file as a script under the interpreter, once for all the tests that read its numbers."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(Path(__file__))], capture_output=True, text=True, env=env, timeout=300)


def interpreted_results() -> dict:
    pytest.importorskip("triton")
    result = interpreted_run()
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow
def test_the_child_process_ran_the_interpreter():
    assert interpreted_results()["interpreted"] is True


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow
def test_interpreted_triton_matches_grid_sample(name):
    found = interpreted_results()[name]
    tolerance = TOLERANCE[CASES[name][6]]
    for key in ("output", *GRADIENTS):
        assert found[key] <= tolerance, f"{name}: {key} differs by {found[key]:.3g} (scaled), over {tolerance:g}"


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.slow
def test_interpreted_half_inputs_are_computed_in_float32(name):
    assert interpreted_results()[name]["against_float32_inputs"] == 0.0


@pytest.mark.slow
def test_interpreted_gradcheck_in_float64():
    assert interpreted_results()["gradcheck"] is True


def test_the_cases_reach_every_part_of_the_map():
    """The cases above are only worth their numbers if points lie inside, across the border and far off."""
    _, (_, locations, _) = case_inputs("outside_the_map")
    inside = ((locations >= 0) & (locations <= 1)).all(-1)
    far = ((locations < -0.5) | (locations > 1.5)).any(-1)
    assert inside.any() and far.any() and (~inside & ~far).any()
    shapes, (_, centres, _) = case_inputs("pixel_centres")
    sizes = torch.tensor([[w, h] for h, w in shapes])[:, None, :]
    pixel = centres * sizes - 0.5  # whole numbers, up to rounding, some off the map
    assert (pixel - pixel.round()).abs().max() < 1e-5 and ((pixel < 0) | (pixel > sizes - 1)).any()


def test_auto_takes_triton_on_cuda_and_gather_on_cpu():
    pytest.importorskip("triton")
    assert resolve_attention_impl("auto", "cuda") == "triton"
    assert resolve_attention_impl("auto", torch.device("cuda", 1)) == "triton"
    assert resolve_attention_impl("auto", "cpu", 2**20) == "gather"
    assert resolve_attention_impl("auto") == "auto"  # a name check only, before any input is seen
    assert resolve_attention_impl("triton") == "triton"
    with pytest.raises(ValueError, match="not one of auto, grid_sample, gather, triton"):
        resolve_attention_impl("tirton")


def test_auto_takes_grid_sample_while_exporting(monkeypatch):
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert resolve_attention_impl("auto", "cuda") == "grid_sample"


def test_triton_where_it_cannot_run_names_the_device_and_the_alternatives():
    if triton_usable("cpu"):
        pytest.skip("TRITON_INTERPRET=1 is set: Triton runs on CPU")
    shapes, (value, locations, weights) = case_inputs("outside_the_map")
    with pytest.raises(RuntimeError, match=r"cannot run on cpu: .*CUDA.*use one of auto, grid_sample, gather"):
        multi_scale_deformable_attention(value, shapes, locations, weights, "triton")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        triton_attention(value, shapes, locations, weights)


def test_without_triton_auto_falls_back_and_triton_says_it_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, f"{sampling.__name__}.triton_jit", None)
    monkeypatch.delattr(sampling, "triton_jit", raising=False)  # an imported submodule is also an attribute
    assert resolve_attention_impl("auto", "cuda", 2**20) == "gather"
    with pytest.raises(RuntimeError, match="cannot run on cuda: Triton does not import"):
        resolve_attention_impl("triton", "cuda")


@pytest.mark.parametrize(("value_type", "compute"), [("*bf16", "float32"), ("*fp64", "float64")])
def test_the_programs_compile_for_a_gpu_without_one(value_type, compute):
    """The interpreter forgives what the compiler rejects (types, constexpr branches): compile both
    programs to an sm_90 binary here, as a launch would on an H100 (Triton ships its own ptxas)."""
    triton = pytest.importorskip("triton")
    if triton_usable("cpu"):
        pytest.skip("TRITON_INTERPRET=1 is set: the programs are interpreted")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from detr_backbone.detection.multiscale.sampling import triton_jit

    constants = {"LEVELS": 4, "POINTS": 4, "BLOCK_Q": 8, "BLOCK_D": 32, "COMPUTE": getattr(triton.language, compute)}
    for kernel in (triton_jit.forward_kernel, triton_jit.backward_kernel):
        names = list(inspect.signature(kernel.fn).parameters)
        buffer = "*fp32" if compute == "float32" else "*fp64"
        types = {name: value_type if name in ("value_ptr", "loc_ptr") else buffer for name in names}
        types.update({"levels_ptr": "*i64", **dict.fromkeys(("queries", "length", "heads", "channels"), "i32")})
        types.update(dict.fromkeys(constants, "constexpr"))
        source = ASTSource(kernel, types, {(names.index(k),): v for k, v in constants.items()})
        binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert len(binary.asm["cubin"]) > 10_000 and kernel.fn.__name__ in binary.asm["ptx"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MID_SIZE = ([(32, 48), (16, 24), (8, 12), (4, 6)], 2, 300, 8, 32, 4)  # four levels, eight heads of 32 channels


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_cuda_triton_matches_grid_sample(dtype):
    found = differences(triton_attention, f"cuda_{dtype}", "cuda", (*MID_SIZE, dtype, "around"))
    tolerance = TOLERANCE[dtype] * (10 if dtype == "float32" else 1)  # sums over 16 points, not 4 or 6
    assert all(value <= tolerance for value in found.values()), found


@needs_cuda
@pytest.mark.parametrize("name", ["pixel_centres", "outside_the_map", "levels_1x1_and_9x13_batch_2_float64"])
def test_cuda_triton_matches_grid_sample_on_the_small_cases(name):
    found = differences(triton_attention, name, "cuda")
    tolerance = TOLERANCE[CASES[name][6]]
    assert all(value <= tolerance for value in found.values()), found


@needs_cuda
def test_cuda_auto_runs_triton():
    shapes, (value, locations, weights) = case_inputs("cuda_auto", "cuda", (*MID_SIZE, "float32", "around"))
    auto = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert torch.equal(auto, triton_attention(value, shapes, locations, weights))


@needs_cuda
def test_cuda_gradcheck_small_float64():
    shapes, inputs = case_inputs("outside_the_map_float64", "cuda")
    inputs = [t.clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: triton_attention(v, shapes, loc, w), inputs, eps=1e-6, atol=1e-7, nondet_tol=1e-12
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(interpreted_checks()))
