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
    assert r.energy_kwh_it == pytest.approx(433_196)  # 1,082,990 GPU-h x 400 W
    assert r.co2_kg_it == pytest.approx(24_692, rel=1e-4)  # the paper's 24.7 t (IT energy)
    assert r.co2_kg == pytest.approx(29_631, rel=1e-4)  # with PUE 1.2: ~30 t
    assert any("29.6 t" in n for n in PUBLISHED_CASES["bloom-176b"].notes)


def test_gopher_energy_is_it_energy():
    r, _ = reproduce(PUBLISHED_CASES["gopher-280b"])
    assert r.co2_kg_it == pytest.approx(351_780, rel=1e-4)  # 1,066 MWh x 330 g
    assert r.co2_kg == pytest.approx(379_922, rel=1e-4)  # x 1.08
    assert r.energy_kwh_it == 1_066_000


def test_gpt3_discrepancy_is_recorded_not_forced():
    case = PUBLISHED_CASES["gpt3-175b"]
    r, _ = reproduce(case)
    assert r.energy_kwh_facility == pytest.approx(1_287_000)  # Patterson's MWh include PUE 1.1
    assert r.co2_kg == pytest.approx(552_000, rel=REL)
    assert r.co2_kg_it == pytest.approx(502_000, rel=REL)  # the BLOOM table's 502 t: IT energy
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
    assert r.inputs == {
        "gpu_hours": 1_000,
        "gpu_power_w": 400,
        "pue": 1.2,
        "intensity_g_per_kwh": 57,
    }


def test_measured_energy_and_renderings():
    r = estimate(energy_kwh=12.5, pue=1.2)
    assert r.intensity_g_per_kwh == carbon.DEFAULT_INTENSITY_G_PER_KWH == 57.0
    assert r.formula.splitlines()[0] == "IT energy       = 12.5 kWh (given)"
    text = carbon.render_text(r)
    assert "energy (facility) 15 kWh   (PUE 1.2)" in text and r.formula in text
    d = json.loads(json.dumps(carbon.to_dict(r)))
    assert d["co2_kg"] == pytest.approx(15 * 57 / 1000) and d["formula"] == r.formula
    assert d["inputs"] == {"energy_kwh": 12.5, "pue": 1.2, "intensity_g_per_kwh": 57.0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "either"),
        ({"energy_kwh": 1.0, "gpu_hours": 1.0, "gpu_power_w": 1.0}, "either"),
        ({"gpu_hours": 10.0}, "gpu_power_w"),
        ({"energy_kwh": 1.0, "pue": 0.8}, "PUE"),
        ({"energy_kwh": 1.0, "intensity_g_per_kwh": -1}, "intensity"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate(**kwargs)


def test_documented_defaults():
    assert carbon.FRANCE_INTENSITY_G_PER_KWH == {
        "luccioni2022_bloom": 57.0,
        "codecarbon_owid_2023": 56.0,
        "green_algorithms": 51.3,
    }
    assert carbon.JEAN_ZAY_PUE == 1.2


# -- `megatrain carbon` ---------------------------------------------------------------------------


def carbon_cli(capsys, *args):
    from megatrain.cli import main

    rc = main(["carbon", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_bloom_shows_the_formula(capsys):
    rc, out, _ = carbon_cli(
        capsys,
        "--gpu-hours",
        "1082990",
        "--gpu-power-w",
        "400",
        "--pue",
        "1.2",
        "--intensity",
        "57",
    )
    assert rc == 0
    assert "IT energy       = 1,082,990 GPU-h x 400 W / 1000 = 433,196 kWh" in out
    assert "CO2e (facility) = 519,835 kWh x 57 gCO2e/kWh / 1000 = 29,631 kg (29.63 t)" in out
    assert "CO2e (IT only)  = 433,196 kWh x 57 gCO2e/kWh / 1000 = 24,692 kg (24.69 t)" in out
    assert "not given on the command line" not in out


def test_cli_json_from_measured_energy(capsys):
    rc, out, _ = carbon_cli(
        capsys, "--energy-kwh", "1066000", "--pue", "1.08", "--intensity", "330", "--json"
    )
    d = json.loads(out)
    assert rc == 0 and d["energy_kwh_it"] == 1_066_000
    assert d["energy_kwh_facility"] == pytest.approx(1_151_280)
    assert (d["co2_kg"], d["co2_kg_it"]) == pytest.approx((379_922.4, 351_780))
    assert d["sources"] == {"pue": "given", "intensity_g_per_kwh": "given", "energy_kwh": "given"}


def test_cli_cluster_profile_supplies_pue_intensity_and_power(capsys):
    from megatrain.config import load_cluster

    local = load_cluster("local")
    rc, out, _ = carbon_cli(capsys, "--gpu-hours", "100", "--cluster", "local", "--json")
    d = json.loads(out)
    assert rc == 0 and (d["pue"], d["intensity_g_per_kwh"]) == (
        local.pue,
        local.carbon_intensity_g_per_kwh,
    )
    assert d["energy_kwh_it"] == pytest.approx(100 * local.device_power_w / 1000)
    assert d["sources"]["gpu_power_w"] == "cluster profile 'local'"
    rc, out, _ = carbon_cli(
        capsys, "--gpu-hours", "100", "--cluster", "local", "--pue", "1.5", "--json"
    )
    assert json.loads(out)["pue"] == 1.5  # an explicit flag beats the profile


def test_cli_defaults_are_stated(capsys):
    rc, out, _ = carbon_cli(capsys, "--energy-kwh", "10")
    assert rc == 0 and "CO2e (facility) = 10 kWh x 57 gCO2e/kWh / 1000 = 0.57 kg" in out
    assert "intensity_g_per_kwh  default: France, Luccioni et al. 2022" in out


def test_cli_published_table_reproduces_every_case(capsys):
    rc, out, _ = carbon_cli(capsys, "--published")
    assert rc == 0
    rows = {}
    for words in map(str.split, out.splitlines()):
        if words and words[0] in PUBLISHED_CASES:
            rows.setdefault(words[0], words)  # the first table: our numbers per case
    assert rows["bloom-176b"][1:] == [
        "433",
        "MWh",
        "1.2",
        "520",
        "MWh",
        "57",
        "24.69",
        "t",
        "29.63",
        "t",
    ]
    assert rows["gopher-280b"][-4:] == ["352", "t", "380", "t"]
    assert rows["llama3.1-8b"][-4:] == ["420", "t", "420", "t"]
    assert "Discrepancy" in out and out.count("CO2e (facility) =") == len(PUBLISHED_CASES)
    rc, out, _ = carbon_cli(capsys, "--published", "--json")
    cases = {c["key"]: c for c in json.loads(out)}
    assert set(cases) == set(PUBLISHED_CASES)
    assert all(
        abs(v["relative_error"]) < REL for c in cases.values() for v in c["published"].values()
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --gpu-hours"),
        (["--gpu-hours", "10"], "--gpu-hours needs --gpu-power-w"),
        (["--energy-kwh", "-1"], "energy_kwh must be >= 0"),
        (["--energy-kwh", "1", "--pue", "0.9"], "PUE must be >= 1"),
        (["--energy-kwh", "1", "--cluster", "nowhere"], "no clusters preset 'nowhere'"),
    ],
)
def test_cli_bad_input_is_one_clear_line(capsys, args, message):
    rc, out, err = carbon_cli(capsys, *args)
    assert rc == 2 and message in err and "Traceback" not in err
