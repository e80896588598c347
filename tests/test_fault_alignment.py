"""Region alignment: below 16 bytes a staged complex128 tensor is misaligned; above a huge page the
padding is waste. Both are refused when the config resolves, naming the bound."""

from __future__ import annotations

import pytest
import torch

from stager import GraphStager, StagerConfig, StagerConfigError
from stager.envs import MAX_ALIGNMENT, MIN_ALIGNMENT


@pytest.mark.parametrize("value", ["1", "2", "4", "8"])
def test_an_alignment_below_16_from_the_environment_is_refused_naming_the_minimum(value: str) -> None:
    with pytest.raises(StagerConfigError) as info:
        StagerConfig.resolve(environ={"STAGER_ALIGNMENT": value})
    msg = str(info.value)
    assert f"STAGER_ALIGNMENT={value!r}" in msg
    assert "smallest alignment allowed is 16" in msg


@pytest.mark.parametrize("value", [1, 8])
def test_an_alignment_below_16_as_a_keyword_is_refused(value: int) -> None:
    with pytest.raises(StagerConfigError, match="keyword alignment=.*smallest alignment allowed is 16"):
        GraphStager(alignment=value)
    with pytest.raises(StagerConfigError, match="smallest alignment allowed is 16"):
        StagerConfig.resolve(environ={}).replace(alignment=value)


@pytest.mark.parametrize("value", ["1TiB", "4MiB"])
def test_an_alignment_above_a_huge_page_is_refused_naming_the_maximum(value: str) -> None:
    with pytest.raises(StagerConfigError) as info:
        StagerConfig.resolve(environ={"STAGER_ALIGNMENT": value})
    msg = str(info.value)
    assert f"STAGER_ALIGNMENT={value!r}" in msg and "largest alignment allowed is 2.00 MiB" in msg


def test_the_bounds_themselves_are_accepted() -> None:
    assert MIN_ALIGNMENT == 16 and MAX_ALIGNMENT == 2 << 20
    assert StagerConfig.resolve(environ={"STAGER_ALIGNMENT": "16"}).alignment == 16
    assert StagerConfig.resolve(environ={"STAGER_ALIGNMENT": "2MiB"}).alignment == 2 << 20


def test_at_the_smallest_alignment_every_staged_tensor_is_aligned_to_its_element() -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "byte": torch.ones(1, dtype=torch.uint8),
        "c128": torch.randn(4096, dtype=torch.complex128, generator=g),
        "odd": torch.ones(3, dtype=torch.int8),
        "c64": torch.randn(33, dtype=torch.complex64, generator=g),
    }
    with GraphStager(alignment=MIN_ALIGNMENT) as stager:
        out = stager.stage(sd)
        for key, t in out.items():
            assert t.data_ptr() % 16 == 0, key
            assert torch.equal(t, sd[key]), key
        assert torch.equal(out["c128"] * 2, sd["c128"] * 2)
