"""The μ per precision × backend (zo_runtime.precision) is the one the signal benchmark measured, and
personalize takes it from the bundle's manifest unless --mu is given."""
import json
from dataclasses import dataclass
from pathlib import Path

from zo_runtime import precision
from zo_runtime.personalize import PersonalizeConfig

ROOT = Path(__file__).resolve().parent.parent


def test_table_is_the_measured_one():
    rows = json.loads((ROOT / precision.RESULTS).read_text())["rows"]
    assert precision.MEASURED == precision.table_from(rows)
    assert all(r["draws"] >= 96 for r in rows)
    mu, corr, _ = precision.MEASURED[("a16w8", "qnn", (500, 900))]
    assert mu is not None    # A16W8 on the HTP keeps a usable signal at some measured mu


def test_choose_mu_takes_the_smallest_mu_that_keeps_the_signal():
    rows = [dict(precision="p", backend="b", timesteps=[0, 500], mu=m, corr=c, draws=96) for m, c in ((1e-3, 0.5), (1e-2, 0.97), (3e-2, 0.99))]
    assert precision.choose_mu(rows, "p", "b") == (1e-2, 0.97)
    assert precision.choose_mu(rows, "p", "b", min_corr=0.995) == (3e-2, 0.99)    # weak: the best one
    low = [dict(r, corr=r["corr"] - 0.6) for r in rows]
    assert precision.choose_mu(low, "p", "b") == (None, low[-1]["corr"])          # no signal anywhere
    assert precision.choose_mu(rows, "p", "other") is None
    flat = [dict(r, corr=c) for r, c in zip(rows, (0.946, 0.948, 0.952))]
    assert precision.choose_mu(flat, "p", "b") == (1e-3, 0.946)                 # flat in μ: the smallest


@dataclass
class FakeBundle:
    unet_precision: str
    noise_schedule = {"num_train_timesteps": 1000}

    def graph(self, name):
        return {"precision": self.unet_precision}


def test_personalize_hook_uses_the_table_unless_mu_is_given(monkeypatch):
    band = (PersonalizeConfig(model="m", images="i", token="<t>", init="dog", out="o").resolved().t_low,
            PersonalizeConfig(model="m", images="i", token="<t>", init="dog", out="o").resolved().t_high)
    monkeypatch.setattr(precision, "MEASURED", {("a16w8", "qnn", band): (1e-2, 0.97, 96),
                                                ("a8w8", "qnn", band): (None, 0.1, 96)})
    said = []
    base = dict(model="m", images="i", token="<t>", init="dog", out="o.safetensors", provider="qnn")
    given = PersonalizeConfig(**base)
    cfg = precision.precision_recipe(given, given.resolved(), FakeBundle("a16w8"), said.append)
    assert cfg.mu == 1e-2 and "mu 0.01 for a16w8 on qnn" in said[-1]
    given = PersonalizeConfig(**base, mu=5e-3)
    cfg = precision.precision_recipe(given, given.resolved(), FakeBundle("a16w8"), said.append)
    assert cfg.mu == 5e-3 and "below" in said[-1]
    given = PersonalizeConfig(**base)
    cfg = precision.precision_recipe(given, given.resolved(), FakeBundle("a8w8"), said.append)
    assert cfg.mu == given.resolved().mu and "no zeroth-order signal" in said[-1]
    n = len(said)
    given = PersonalizeConfig(**dict(base, provider="cpu"))
    assert precision.precision_recipe(given, given.resolved(), FakeBundle("a16w8"), said.append) == given.resolved()
    assert len(said) == n    # not measured: nothing chosen, nothing said


def test_the_run_s_timestep_band_picks_the_row_and_a_better_band_is_named(monkeypatch):
    """The signal depends on the timestep band; personalize looks up its own band, falls back to the nearest
    measured one (saying so), and where its band is weak names a measured band that is not."""
    monkeypatch.setattr(precision, "MEASURED", {("a16w8", "cpu", (0, 500)): (3e-2, 0.63, 96),
                                                ("a16w8", "cpu", (500, 900)): (3e-2, 0.95, 96),
                                                ("int8w", "cpu", (500, 900)): (1e-3, 1.0, 96)})
    said = []
    base = dict(model="m", images="i", token="<t>", init="dog", out="o.safetensors", provider="cpu")
    given = PersonalizeConfig(**base, t_low=0, t_high=500)
    cfg = precision.precision_recipe(given, given.resolved(), FakeBundle("a16w8"), said.append)
    assert cfg.mu == 3e-2 and "0.63" in said[-1] and "--t-low 500 --t-high 900" in said[-1]
    given = PersonalizeConfig(**base, t_low=500, t_high=900)
    cfg = precision.precision_recipe(given, given.resolved(), FakeBundle("a16w8"), said.append)
    assert cfg.mu == 3e-2 and "0.95" in said[-1] and "--t-low" not in said[-1]
    assert precision.recipe_for("int8w", "cpu", (0, 500)) == (1e-3, 1.0, 96, (500, 900))    # nearest measured
    assert precision.recipe_for("int8w", "qnn", (0, 500)) is None


def test_a_weak_npu_bundle_names_the_precision_that_keeps_the_signal():
    """On the (simulated) HTP, A16W8 is weak and FP16 is not (the stored table): personalize on an A16W8 bundle
    says how to convert one that keeps the signal."""
    said = []
    given = PersonalizeConfig(model="m", images="i", token="<t>", init="dog", out="o.safetensors", provider="qnn",
                              t_low=500, t_high=900)
    precision.precision_recipe(given, given.resolved(), FakeBundle("a16w8"), said.append)
    assert "--weights fp16" in said[-1] and "0.92 on qnn at mu 0.01" in said[-1], said
    said.clear()
    precision.precision_recipe(given, given.resolved(), FakeBundle("fp16"), said.append)
    assert "mu 0.01 for fp16 on qnn" in said[-1] and "--weights fp16" not in said[-1]
