"""hcx-server test suite (a package so top-level test files can `from tests.fixtures import ...`)."""
