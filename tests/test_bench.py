"""`hcx-cli bench` (issue 7): a quick smoke run on the tiny demo model, and its helpers.

No timing assertions: the bench's output format and its own correctness checks (every route
returns the in-process text) are what is tested.
"""

from __future__ import annotations

import re

import torch

import server
from benchmarks import bench
from tests.fixtures import run_cli

SUMMARY = re.compile(r"^overhead_ratio=(\d+\.\d+) stream_overhead_ratio=(\d+\.\d+)$")


def test_bench_smoke_on_the_tiny_model():
    done = run_cli(["bench", "--reps", "1", "--tokens", "6", "--threads", "1"], timeout=240)
    out = done.stdout.decode("utf-8", "replace")
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr.decode(errors='replace')[-3000:]}"
    lines = out.strip().splitlines()
    match = SUMMARY.match(lines[-1])
    assert match, f"last line is not the summary: {lines[-1]!r}"
    overhead, stream_overhead = (float(x) for x in match.groups())
    assert overhead > 0 and stream_overhead > 0
    assert "checks: every route returned the in-process text (6 tokens): ok" in lines
    assert lines[-2] == "checks: ok"
    for route in bench.BENCH_ROUTES:
        assert any(line.startswith(route) for line in lines), route


def test_sse_parsing_joins_content_deltas_and_times_them():
    chunks = [(0.1, b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'),
              (0.2, b'data: {"choices": [{"delta": {"content": "\xec\x95\x88"}}]}\n\ndata: {"choi'),
              (0.3, b'ces": [{"delta": {"content": "b"}}]}\n\n'),
              (0.4, b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}\n\ndata: [DONE]\n\n')]
    text, times = bench._sse_text(chunks)
    assert text == "안b" and times == [0.2, 0.3]
    assert bench._cadence([1.0, 1.5, 3.0]) == 1.0


def test_full_size_model_has_hcx_shapes_in_the_hcx_format(tmp_path):
    """The --full model is the tiny HCX v2 package at the real shapes (here on the meta device, with
    the tiny tokenizer: the vocabulary is set to the full one's size)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests import tiny_models

    text = {**bench.FULL_TEXT, "vocab_size": bench.FULL_VOCAB}
    tiny_models.write_hcx_v2_folder(tmp_path, tiny_models.build_tiny_hcx_tokenizer(), text=text,
                                    vision=bench.FULL_VISION, grid=bench.FULL_GRID)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for mod in server.vision_modules(model) for p in mod.parameters())
    total, decode = bench._weight_bytes(model)  # meta params still report their element size
    assert 3.5e9 < params < 3.8e9 and 0.40e9 < vision < 0.46e9, (params, vision)
    assert 3.1e9 < decode / 4 < 3.4e9  # fp32 meta: decoder + lm_head, no vision, no input embedding
    assert model.mm_projector.side ** 2 == 81 and config.vision_config["image_size"] == 378
