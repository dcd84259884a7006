"""The op vocabulary is defined once per language: fastmf/ops/codes.py and csrc/codes.h.
This proves the two agree, and that no other file defines the codes again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastmf.ops import codes

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "codes.h"


def _snake_upper(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


def _header_enums() -> dict[str, dict[str, int]]:
    text = HEADER.read_text()
    enums = {}
    for name, body in re.findall(r"enum class (\w+) : int64_t \{([^}]*)\}", text):
        members = dict(re.findall(r"k(\w+) = (\d+)", body))
        enums[name] = {_snake_upper(k): int(v) for k, v in members.items()}
    return enums


@pytest.mark.skipif(not HEADER.exists(), reason="csrc/codes.h is not in this checkout")
@pytest.mark.parametrize("enum", [codes.Loss, codes.PairwiseLoss, codes.Optimizer,
                                  codes.Pooling, codes.WeightDecay])
def test_python_and_cpp_codes_agree(enum):
    header = _header_enums()
    assert enum.__name__ in header, f"csrc/codes.h has no enum class {enum.__name__}"
    assert header[enum.__name__] == {m.name: int(m) for m in enum}


@pytest.mark.skipif(not HEADER.exists(), reason="csrc/codes.h is not in this checkout")
def test_huber_delta_agrees():
    match = re.search(r"kHuberDelta = ([0-9.]+);", HEADER.read_text())
    assert match and float(match.group(1)) == codes.HUBER_DELTA


@pytest.mark.parametrize("enum", [codes.Loss, codes.PairwiseLoss, codes.Optimizer])
def test_parse_accepts_members_codes_and_names(enum):
    for member in enum:
        assert codes.parse(enum, member, "op", "x") is member
        assert codes.parse(enum, int(member), "op", "x") is member
        assert codes.parse(enum, member.name.lower(), "op", "x") is member
    with pytest.raises(ValueError, match=r"fastmf\.op: unknown x code 99"):
        codes.parse(enum, 99, "op", "x")
    with pytest.raises(ValueError, match=r"fastmf\.op: unknown x 'nope'; expected one of"):
        codes.parse(enum, "nope", "op", "x")
    with pytest.raises(ValueError):
        codes.parse(enum, True, "op", "x")


def test_no_other_python_module_defines_the_codes():
    # The old spellings: name tuples and name->code dicts outside fastmf/ops/codes.py.
    pattern = re.compile(r"^(LOSSES|OPTIMIZERS|LOSS_CODES|OPTIMIZER_CODES|PAIRWISE_LOSSES)\s*=",
                         re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "fastmf").rglob("*.py")
                 if p.name != "codes.py" and pattern.search(p.read_text())]
    assert offenders == []
