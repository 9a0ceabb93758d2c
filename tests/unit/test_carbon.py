"""Carbon calculator: arithmetic, the formula string, and the published cases the lectures quote."""
import json

import pytest

from megatrain import carbon
from megatrain.carbon import PUBLISHED_CASES, estimate, implied_intensity_g_per_kwh, reproduce

# Published numbers are rounded to 3-4 significant digits: 0.2% covers that, not a wrong formula.
REL = 2e-3


@pytest.mark.parametrize("key", sorted(PUBLISHED_CASES))
def test_published_case_reproduces(key):
    case = PUBLISHED_CASES[key]
    assert case.source and case.notes and case.published
    _, rows = reproduce(case)
    for field, (published, ours, rel_err) in rows.items():
        assert abs(rel_err) < REL, f"{key}.{field}: published {published}, ours {ours:.0f}"


def test_bloom():
    r, _ = reproduce(PUBLISHED_CASES["bloom-176b"])
    assert r.energy_kwh_it == pytest.approx(433_196)        # 1,082,990 GPU-h x 400 W
    assert r.co2_kg_it == pytest.approx(24_692, rel=1e-4)    # the paper's 24.7 t (IT energy)
    assert r.co2_kg == pytest.approx(29_631, rel=1e-4)       # with PUE 1.2: ~30 t
    assert any("29.6 t" in n for n in PUBLISHED_CASES["bloom-176b"].notes)


def test_gopher_energy_is_it_energy():
    r, _ = reproduce(PUBLISHED_CASES["gopher-280b"])
    assert r.co2_kg_it == pytest.approx(351_780, rel=1e-4)   # 1,066 MWh x 330 g
    assert r.co2_kg == pytest.approx(379_922, rel=1e-4)      # x 1.08
    assert r.energy_kwh_it == 1_066_000


def test_gpt3_discrepancy_is_recorded_not_forced():
    case = PUBLISHED_CASES["gpt3-175b"]
    r, _ = reproduce(case)
    assert r.energy_kwh_facility == pytest.approx(1_287_000)  # Patterson's MWh include PUE 1.1
    assert r.co2_kg == pytest.approx(552_000, rel=REL)
    assert r.co2_kg_it == pytest.approx(502_000, rel=REL)     # the BLOOM table's 502 t: IT energy
    assert any(n.startswith("Discrepancy") for n in case.notes)


def test_llama31_8b_implied_intensity():
    case = PUBLISHED_CASES["llama3.1-8b"]
    assert case.inputs["pue"] == 1.0  # the card counts TDP x hours only
    energy_kwh = 1.46e6 * 700 / 1000
    assert energy_kwh == pytest.approx(1_022_000)
    assert implied_intensity_g_per_kwh(420_000, energy_kwh) == pytest.approx(410.96, abs=0.01)
    r, _ = reproduce(case)
    assert r.co2_kg == pytest.approx(420_000, rel=1e-3) and r.co2_kg == r.co2_kg_it


def test_formula_shows_the_arithmetic():
    r = estimate(gpu_hours=1_000, gpu_power_w=400, pue=1.2, intensity_g_per_kwh=57)
    assert r.formula.splitlines() == [
        "IT energy       = 1,000 GPU-h x 400 W / 1000 = 400 kWh",
        "facility energy = 400 kWh x PUE 1.2 = 480 kWh",
        "CO2e (facility) = 480 kWh x 57 gCO2e/kWh / 1000 = 27.36 kg (0.0274 t)",
        "CO2e (IT only)  = 400 kWh x 57 gCO2e/kWh / 1000 = 22.8 kg (0.0228 t)",
    ]
    assert (r.energy_kwh_it, r.energy_kwh_facility) == pytest.approx((400, 480))
    assert (r.co2_kg, r.co2_kg_it) == pytest.approx((27.36, 22.8))
    assert r.inputs == {"gpu_hours": 1_000, "gpu_power_w": 400, "pue": 1.2, "intensity_g_per_kwh": 57}


def test_measured_energy_and_renderings():
    r = estimate(energy_kwh=12.5, pue=1.2)
    assert r.intensity_g_per_kwh == carbon.DEFAULT_INTENSITY_G_PER_KWH == 57.0
    assert r.formula.splitlines()[0] == "IT energy       = 12.5 kWh (given)"
    text = carbon.render_text(r)
    assert "energy (facility) 15 kWh   (PUE 1.2)" in text and r.formula in text
    d = json.loads(json.dumps(carbon.to_dict(r)))
    assert d["co2_kg"] == pytest.approx(15 * 57 / 1000) and d["formula"] == r.formula
    assert d["inputs"] == {"energy_kwh": 12.5, "pue": 1.2, "intensity_g_per_kwh": 57.0}


@pytest.mark.parametrize("kwargs, match", [
    ({}, "either"),
    ({"energy_kwh": 1.0, "gpu_hours": 1.0, "gpu_power_w": 1.0}, "either"),
    ({"gpu_hours": 10.0}, "gpu_power_w"),
    ({"energy_kwh": 1.0, "pue": 0.8}, "PUE"),
    ({"energy_kwh": 1.0, "intensity_g_per_kwh": -1}, "intensity"),
])
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate(**kwargs)


def test_documented_defaults():
    assert carbon.FRANCE_INTENSITY_G_PER_KWH == {
        "luccioni2022_bloom": 57.0, "codecarbon_owid_2023": 56.0, "green_algorithms": 51.3}
    assert carbon.JEAN_ZAY_PUE == 1.2
