"""Shared test fixtures: small real-JPEG datasets written by the tests themselves."""

import os

import pytest

# Tests run on 2-core CPU machines; keep torch from oversubscribing when several processes start.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """ImageFolder with 10 classes x 12 JPEGs of 64 px, written once per test session."""
    from ffcv_imagenet.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("shapes") / "train", images_per_class=12, size_px=64)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
