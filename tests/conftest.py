"""Fixtures for the tests under tests/ (all defined in tests/fixtures.py, reusable elsewhere)."""

from tests.fixtures import (  # noqa: F401  (pytest finds fixtures by name in this module)
    demo_model_dir,
    demo_server,
    hcx_model_dir,
    hcx_server,
    hcx_server_url,
    hcx_v2_model_dir,
    hcx_v2_server_url,
    make_server,
    model_url,
    server_url,
)
