"""Test set-up: four simulated CPU devices, so sharding is exercised without accelerators."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def captured(monkeypatch):
  """The figures as drawn, by name: `plots._save` keeps them (and still writes the files)."""
  from weight_averaging.studies import plots  # pylint: disable=g-import-not-at-top
  figures = {}
  save = plots._save

  def keep(fig, output_dir, name):
    figures[name] = fig
    return save(fig, output_dir, name)

  monkeypatch.setattr(plots, "_save", keep)
  return figures
