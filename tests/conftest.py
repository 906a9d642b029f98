import os

# No network here, on CI or on the GPU machine: make the hub client fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECS = Path(__file__).resolve().parent / "specs"


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random FLUX.2 Klein pipeline saved with save_pretrained into a temporary folder."""
    from otherview.model import save_builtin

    return save_builtin("tiny", tmp_path_factory.mktemp("tiny-klein") / "pipeline")


@pytest.fixture(scope="session")
def tiny_pipe():
    from otherview.model import build_builtin

    return build_builtin("tiny")


@pytest.fixture()
def runner():
    from click.testing import CliRunner

    return CliRunner()
