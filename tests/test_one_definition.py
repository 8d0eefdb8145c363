"""The facts every kernel must share are defined once, in esgdm.rule, and each copy agrees.

The Triton kernel module and the C++ header cannot import the package (the kernel module
stays usable on its own; C++ cannot import Python), so each holds a copy of the column
indices of ``scalars``/``hparams``, the bits of ``flags`` and the floor of the default
rule.  These tests change nothing; they fail as soon as a copy drifts from esgdm.rule.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from esgdm import rule

ROOT = Path(__file__).resolve().parent.parent
HEADER = (ROOT / "csrc" / "esgdm_update.h").read_text()


def _cpp_enum(name: str) -> list[str]:
    """The member names of ``enum name : int { ... }`` in the header, in order."""
    body = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{([^}]*)\}", HEADER)
    assert body, f"enum {name} not found in esgdm_update.h"
    members = [m.split("=")[0].strip() for m in body.group(1).split(",") if m.strip()]
    assert re.search(r"=\s*0\b", body.group(1).split(",")[0]), f"{name} must start at 0"
    return members


def _camel(column: str) -> str:
    return "k" + "".join(part.capitalize() for part in column.split("_"))


def _cpp_constant(name: str) -> float:
    """A ``constexpr`` number of the header: decimal, or a hexadecimal float literal
    (``0x1.020408p-7f``), read exactly."""
    found = re.search(r"constexpr\s+\w+\s+" + name
                      + r"\s*=\s*(0[xX][0-9a-fA-F.]+[pP][+-]?\d+|[0-9.eE+-]+)[fF]?\s*;", HEADER)
    assert found, f"{name} not found in esgdm_update.h"
    text = found.group(1)
    return float.fromhex(text) if text.lower().startswith("0x") else float(text)


def test_cpp_columns_follow_the_rule():
    assert _cpp_enum("ScalarColumn") == [_camel(c) for c in rule.SCALAR_COLUMNS] + ["kNumScalarColumns"]
    assert _cpp_enum("HparamColumn") == [_camel(c) for c in rule.HPARAM_COLUMNS] + ["kNumHparamColumns"]


def test_cpp_flags_and_floor_follow_the_rule():
    assert _cpp_constant("kFlagExact") == rule.FLAG_EXACT
    assert _cpp_constant("kFlagStochasticRounding") == rule.FLAG_STOCHASTIC_ROUNDING
    assert _cpp_constant("kDscaleFloor") == rule.DSCALE_FLOOR


def test_triton_copies_follow_the_rule():
    kernels = pytest.importorskip("esgdm.kernels.esgdm_step", reason="needs triton")
    for i, column in enumerate(rule.SCALAR_COLUMNS):
        assert getattr(kernels, column.upper()) == i == getattr(rule, column.upper())
    for i, column in enumerate(rule.HPARAM_COLUMNS):
        assert getattr(kernels, column.upper()) == i == getattr(rule, column.upper())
    assert kernels.N_SCALAR_COLUMNS == len(rule.SCALAR_COLUMNS)
    assert kernels.N_HPARAM_COLUMNS == len(rule.HPARAM_COLUMNS)
    assert kernels.FLAG_EXACT == rule.FLAG_EXACT
    assert kernels.FLAG_STOCHASTIC_ROUNDING == rule.FLAG_STOCHASTIC_ROUNDING
    assert kernels.DSCALE_FLOOR == rule.DSCALE_FLOOR


def test_the_triton_kernel_reads_no_column_by_number():
    """Every read or write of a ``scalars``/``hparams`` row goes through a named column."""
    source = "".join((ROOT / "kernels" / name).read_text() for name in ("esgdm_step.py", "esgdm_elements.py"))
    assert not re.findall(r"\b[sh]row\s*\+\s*\d", source)


def test_triton_dtypes_follow_the_capability_table():
    """The kernel module's dtype lists are the ``triton`` row of the capability table."""
    kernels = pytest.importorskip("esgdm.kernels.esgdm_step", reason="needs triton")
    from esgdm.backends import CAPABILITIES

    row = CAPABILITIES["triton"]
    assert tuple(kernels.DTYPES) == row.params
    assert all(row.state_dtypes(p) == tuple(kernels.STATE_DTYPES) for p in row.params)


def test_8bit_state_copies_follow_the_quantizer():
    """The block size, scale columns, code levels, the levels' float32 reciprocals that
    decoding multiplies by and encode_m's pre-scale of extreme scales, of esgdm.quant,
    as the C++ header and the Triton kernel module hold them."""
    from esgdm import quant

    assert _cpp_constant("kQuantBlock") == quant.BLOCK
    assert _cpp_constant("kQuantMScale") == quant.M_SCALE
    assert _cpp_constant("kQuantDScale") == quant.D_SCALE
    assert _cpp_constant("kQuantMLevels") == quant.M_LEVELS
    assert _cpp_constant("kQuantMZero") == quant.M_ZERO
    assert _cpp_constant("kQuantDLevels") == quant.D_LEVELS
    assert _cpp_constant("kQuantInvMLevels") == quant.INV_M_LEVELS
    assert _cpp_constant("kQuantInvDLevels") == quant.INV_D_LEVELS
    assert _cpp_constant("kQuantTiny") == quant.TINY
    assert _cpp_constant("kQuantHuge") == quant.HUGE
    assert _cpp_constant("kQuantPrescale") == quant.PRESCALE
    kernels = pytest.importorskip("esgdm.kernels.esgdm_step", reason="needs triton")
    assert kernels.QUANT_BLOCK == quant.BLOCK
    assert (kernels.QUANT_M_SCALE, kernels.QUANT_D_SCALE) == (quant.M_SCALE, quant.D_SCALE)
    assert (kernels.QUANT_M_LEVELS, kernels.QUANT_M_ZERO, kernels.QUANT_D_LEVELS) == (
        quant.M_LEVELS, quant.M_ZERO, quant.D_LEVELS)
    assert (kernels.QUANT_INV_M_LEVELS, kernels.QUANT_INV_D_LEVELS) == (
        quant.INV_M_LEVELS, quant.INV_D_LEVELS)
    assert (kernels.QUANT_TINY, kernels.QUANT_HUGE, kernels.QUANT_PRESCALE) == (
        quant.TINY, quant.HUGE, quant.PRESCALE)
    for config in (*kernels.CONFIGS.values(), kernels.SMALL_CONFIG):
        assert config["BLOCK"] % quant.BLOCK == 0, "a program must hold whole quantization blocks"


def test_8bit_codes_decode_by_the_reciprocal_constants():
    """Decoding multiplies by quant.INV_M_LEVELS / INV_D_LEVELS (through the copies
    above) and encoding divides once per block: no backend divides by the levels."""
    source = "".join((ROOT / "kernels" / name).read_text() for name in ("esgdm_step.py", "esgdm_elements.py"))
    for text, levels, inverses in ((HEADER, ("kQuantMLevels", "kQuantDLevels"),
                                    ("kQuantInvMLevels", "kQuantInvDLevels")),
                                   (source, ("_QM_LEVELS", "_QD_LEVELS"), ("_QM_INV", "_QD_INV"))):
        for name in levels:
            assert not re.search(r"/\s*" + name + r"\b", text), name
            assert not re.search(r"_div\([^()]*,\s*" + name + r"\b", text), name
        for name in inverses:
            assert re.search(r"\*\s*" + name + r"\b", text), name
