"""The demo-model probe (demo/skyrt_demo/probe.py): VAE read-back and prompt sensitivity.

The read-back is the detector's reading of world clips after the model's VAE round trip; on the shipped
demo VAE it must keep background, colour and every shape at the world's radius, and lose some shapes at
the first world's smaller radius; a random VAE must lose the colour. The sensitivity measurement itself
is tested in tests/test_demo_train.py.

    python -m pytest tests/test_demo_probe.py -q
"""
from __future__ import annotations

import pytest
import torch

from skyrt_demo import probe as P
from skyrt_demo import world as W
from skyrt.export.loaders import load_vae
from skyrt.export.vae import VAEConfig, WanVAE
from skyrt.runtime.default_model import SHIPPED_DEMO_MODEL
from skyrt.runtime.model_folder import OFFICIAL_VAE

shipped = pytest.mark.skipif(not (SHIPPED_DEMO_MODEL / "config.json").is_file(), reason="no demo model shipped")


@shipped
def test_shipped_vae_keeps_every_shape_at_the_worlds_radius_and_loses_some_at_the_first_worlds():
    vae = load_vae(SHIPPED_DEMO_MODEL / OFFICIAL_VAE, "official").eval()
    result = P.vae_readback(vae, clips=5)
    assert result["right"]["background"] == 1.0 and result["right"]["colour"] == 1.0
    assert result["shape_read_as"] == {s: [s] for s in W.SHAPES}
    with P.radius_range((0.09, 0.13)):  # the first world's shapes: too small for this VAE
        small = P.vae_readback(vae, clips=5)
    assert small["right"]["colour"] == 1.0 and small["right"]["shape"] < 1.0
    assert W.RADIUS_RANGE != (0.09, 0.13)  # the context manager put the world back


def test_a_random_vae_loses_the_colour():
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8, num_res_blocks=1)).eval()
    assert P.vae_readback(vae, clips=5)["right"]["colour"] <= 0.4


@shipped
def test_probe_cli_reports_both_measurements(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert P.main(["--clips", "5", "--threads", "1", "--out", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    assert set(report["prompt_sensitivity"]) == set(W.ATTRIBUTE_NAMES)
    assert report["vae_readback"]["clips"] == 5
    with pytest.raises(SystemExit):
        P.main(["--radius", "0.3"])
