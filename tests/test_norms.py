"""The per-tensor norms behind every per-step figure: values, order and dtypes."""

import pytest
import torch

from gradwatch.stats import foreach_norms


def _reference(tensors):
    return torch.stack(
        [torch.linalg.vector_norm(t.to_dense().double()).float() for t in tensors]
    )


def _mixed_shapes(count: int) -> list[torch.Tensor]:
    shapes = [(16, 16), (16,), (3, 5, 7), (1,), (64, 64)]
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(shapes[i % len(shapes)], generator=generator) for i in range(count)
    ]


@pytest.mark.parametrize("count", [1, 7, 8, 100, 1000])
def test_norms_match_reference_in_input_order(count):
    tensors = _mixed_shapes(count)

    norms = foreach_norms(tensors)

    assert norms.shape == (count,)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, _reference(tensors), rtol=1e-5, atol=0.0)


def test_norms_of_stacks_larger_than_one_chunk():
    # 600 tensors of 4096 elements exceed one stack of 2**20 elements.
    tensors = [torch.full((64, 64), float(i)) for i in range(600)]

    norms = foreach_norms(tensors)

    expected = torch.arange(600, dtype=torch.float32) * 64.0
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stacked_low_precision_norms_do_not_overflow(dtype):
    tensors = [torch.full((32, 32), 300.0, dtype=dtype) for _ in range(20)]

    norms = foreach_norms(tensors)

    assert norms.dtype == torch.float32
    assert torch.isfinite(norms).all()
    torch.testing.assert_close(norms, torch.full((20,), 300.0 * 32), rtol=1e-3, atol=0)


def test_norms_mix_dtypes_and_sparse_tensors():
    dense = _mixed_shapes(30)
    half = [t.half() for t in _mixed_shapes(10)]
    sparse = torch.zeros(8, 8)
    sparse[2, 3] = 3.0
    sparse[5, 1] = 4.0
    tensors = [*dense[:15], *half, sparse.to_sparse(), *dense[15:]]

    norms = foreach_norms(tensors)

    assert norms[25].item() == pytest.approx(5.0)
    torch.testing.assert_close(norms, _reference(tensors), rtol=1e-3, atol=0.0)


def test_norms_of_nonfinite_tensors_stay_nonfinite():
    tensors = [torch.ones(4, 4) for _ in range(10)]
    tensors[3] = torch.full((4, 4), float("nan"))
    tensors[6] = torch.full((4, 4), float("inf"))

    norms = foreach_norms(tensors)

    assert torch.isnan(norms[3])
    assert torch.isinf(norms[6])
    assert torch.isfinite(norms[[0, 1, 2, 4, 5, 7, 8, 9]]).all()


def test_norms_of_no_tensors_are_empty():
    assert foreach_norms([]).shape == (0,)
