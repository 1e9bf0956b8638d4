"""Shared fixtures: one tiny diffusers pipeline (the oracle) and its weights in both layouts."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/checkpoints.py

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def oracle_pipe(tmp_path_factory):
    from checkpoints import build_diffusers_pipeline

    return build_diffusers_pipeline(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="session")
def diffusers_dir(oracle_pipe, tmp_path_factory) -> Path:
    from checkpoints import write_diffusers_layout

    return write_diffusers_layout(oracle_pipe, tmp_path_factory.mktemp("diffusers") / "model")


@pytest.fixture(scope="session")
def official_dir(oracle_pipe, tmp_path_factory) -> Path:
    from checkpoints import write_official_layout

    return write_official_layout(oracle_pipe, tmp_path_factory.mktemp("official") / "model")


@pytest.fixture(scope="session")
def official_pipeline(official_dir):
    import skyrt

    return skyrt.load(official_dir)
