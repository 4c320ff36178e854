"""The benchmark of hcx-server (`hcx-cli bench`)."""
