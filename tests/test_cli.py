"""hcx-cli through real subprocesses on the tiny demo model (offline, clean environment).

All runs of the module are listed in plan() and started two at a time in the background when
the first test needs one; tests then check each run and compare runs with each other (streamed
vs --no-stream vs --json vs stdin, --demo vs --model-path, CLI vs the HTTP API).
"""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures import SEED_ROUTE, LiveServer, b64, image_bytes, local_only, post, run_cli

MAX_TOKENS = "8"
SAMPLING = ("--max-tokens", MAX_TOKENS, "--seed", "1")
ASK = ("ask", "이 모델은 무엇인가요? QUOKKA-7731", "--max-tokens", MAX_TOKENS, "--seed", "4", "--temperature", "0.7",
       "--top-p", "0.9")


def plan(demo: str, files: dict) -> dict:
    """Every hcx-cli run of this module: name -> (args, env, stdin). Tests compare runs with each other."""
    m = ("--model-path", demo)
    return {
        # model runs
        "describe_one": ((*m, "describe", files["red.png"], *SAMPLING), None, None),
        "describe_several_no_stream": ((*m, "describe", files["red.png"], files["photo.jpg"], "--no-stream",
                                        *SAMPLING), None, None),
        "describe_json": ((*m, "describe", files["red.png"], files["photo.jpg"], "--json", *SAMPLING), None, None),
        "describe_stdin_json": ((*m, "describe", "-", "--json", *SAMPLING), None, image_bytes("png")),
        "ask_demo_stream": (("--demo", *ASK), {"DEMO_MODEL_DIR": demo}, None),
        "ask_json": ((*m, *ASK, "--json"), None, None),
        "selfcheck": (("--demo", "selfcheck", "--max-tokens", MAX_TOKENS), {"DEMO_MODEL_DIR": demo}, None),
        "selfcheck_random_weights": ((*m, "selfcheck", "--max-tokens", MAX_TOKENS), None, None),
        # runs that stop before (or instead of) loading
        "download_local": ((*m, "download"), None, None),
        "bad_path": ((*m, "describe", files["missing"]), None, None),
        "bad_stdin": ((*m, "describe", "-"), None, b"GIF89a but not really"),
        "second_file_bad": ((*m, "describe", files["red.png"], files["notes.png"]), None, None),
        "ask_blank": ((*m, "ask", "  "), None, None),
        "env_dtype": ((*m, "ask", "hi"), {"DTYPE": "fp8"}, None),
        "env_device": ((*m, "ask", "hi"), {"DEVICE": "gpu"}, None),
        "option_dtype": ((*m, "--dtype", "int4", "ask", "hi"), None, None),
        "device_absent": ((*m, "ask", "hi"), {"DEVICE": "cuda:7"}, None),
        "download_missing": (("--model-path", files["no_model"], "download"), None, None),
    }


class Runs:
    """hcx-cli runs started two at a time in the background (each is mostly Python start-up)."""

    def __init__(self, runs: dict):
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures = {name: self.pool.submit(run_cli, list(args), env=env, input=stdin, timeout=180)
                        for name, (args, env, stdin) in runs.items()}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        return self.futures[name].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def demo(demo_model_dir) -> str:
    return str(demo_model_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cli-images")
    paths = {}
    for name, data in {"red.png": image_bytes("png"), "photo.jpg": image_bytes("exif_rotated_jpeg"),
                       "notes.png": b"these are notes, not pixels\n"}.items():
        (folder / name).write_bytes(data)
        paths[name] = str(folder / name)
    paths["missing"] = str(folder / "missing.png")
    paths["no_model"] = str(folder / "no-model-here")
    return paths


@pytest.fixture(scope="module")
def runs(demo, files):
    started = Runs(plan(demo, files))
    yield started
    started.close()


def out(proc) -> str:
    return proc.stdout.decode("utf-8")


def err(proc) -> str:
    return proc.stderr.decode("utf-8", "replace")


def ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {out(proc)[-2000:]}\nstderr: {err(proc)[-3000:]}"
    assert "Traceback" not in err(proc), err(proc)
    return out(proc)


def assert_clean_failure(proc, code: int, *words: str) -> str:
    """Exit `code`, one `error: ...` line on stderr naming `words`, nothing on stdout, no traceback."""
    stderr = err(proc)
    assert proc.returncode == code, f"exit {proc.returncode} (wanted {code})\nstderr: {stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"wanted one clear line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert out(proc) == ""
    return lines[0]



# -- describe ---------------------------------------------------------------------------


def test_describe_one_image_streams_text(runs):
    text = ok(runs["describe_one"])
    assert text.endswith("\n")
    assert not text.startswith("== ")  # one image: no header line


def test_describe_json_one_object_per_line(runs, files):
    lines = ok(runs["describe_json"]).splitlines()
    assert len(lines) == 2, lines
    objects = [json.loads(line) for line in lines]
    assert [o["image"] for o in objects] == [files["red.png"], files["photo.jpg"]]
    for o in objects:
        assert isinstance(o["result"], str)
        assert o["finish_reason"] in ("stop", "length")
        assert o["prompt_tokens"] > 0
        assert 1 <= o["completion_tokens"] <= int(MAX_TOKENS)
    # the streamed text of the same image and seed is the same answer
    assert ok(runs["describe_one"]) == objects[0]["result"] + "\n"


def test_describe_several_images_no_stream(runs, files):
    results = [json.loads(line)["result"] for line in ok(runs["describe_json"]).splitlines()]
    expected = f"== {files['red.png']}\n{results[0]}\n== {files['photo.jpg']}\n{results[1]}\n"
    assert ok(runs["describe_several_no_stream"]) == expected


def test_describe_reads_stdin(runs):
    from_stdin = json.loads(ok(runs["describe_stdin_json"]))
    assert from_stdin["image"] == "-"
    from_file = json.loads(ok(runs["describe_json"]).splitlines()[0])  # the same PNG, from a file
    assert from_stdin["result"] == from_file["result"]
    assert from_stdin["prompt_tokens"] == from_file["prompt_tokens"]


@local_only
def test_cli_and_server_answer_alike(runs, server_url):
    # same model, seed, prompt and image: the terminal and the API share one code path
    from_cli = json.loads(ok(runs["describe_json"]).splitlines()[0])["result"]
    resp = post(server_url, SEED_ROUTE, {"prompt": "Describe this image.", "image_base64": b64(image_bytes("png")),
                                         "max_tokens": int(MAX_TOKENS), "seed": 1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["result"] == from_cli


@pytest.mark.parametrize("name,words", [
    ("bad_path", ["missing.png", "cannot read"]),
    ("bad_stdin", ["stdin", "not a readable image"]),
    ("second_file_bad", ["notes.png", "not a readable image"]),  # checked before loading: no partial output
])
def test_describe_bad_input_is_a_clear_error(runs, name, words):
    assert_clean_failure(runs[name], 2, *words)


# -- ask ----------------------------------------------------------------------------------


def test_ask_json(runs):
    lines = ok(runs["ask_json"]).splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert set(obj) >= {"result", "finish_reason", "prompt_tokens", "completion_tokens"}
    assert isinstance(obj["result"], str) and 1 <= obj["completion_tokens"] <= int(MAX_TOKENS)
    assert "QUOKKA-7731" not in obj["result"]


def test_ask_demo_flag_streams_the_same_answer(runs):
    # --demo with DEMO_MODEL_DIR loads the same tiny model as --model-path: same seed, same answer
    proc = runs["ask_demo_stream"]
    assert ok(proc) == json.loads(ok(runs["ask_json"]))["result"] + "\n"
    assert "DEMO MODE" in err(proc)


def test_ask_blank_prompt_is_a_clear_error(runs):
    assert_clean_failure(runs["ask_blank"], 2, "prompt")


# -- configuration errors -----------------------------------------------------------------


@pytest.mark.parametrize("name,key,value", [("env_dtype", "DTYPE", "fp8"), ("env_device", "DEVICE", "gpu"),
                                            ("option_dtype", "DTYPE", "int4")])
def test_bad_setting_is_one_line_naming_the_key(runs, name, key, value):
    line = assert_clean_failure(runs[name], 2, f"{key}=", value)
    assert "expected" in line


def test_unavailable_device_is_one_clear_line(runs):
    # cuda:7 is well-formed but absent here (CPU-only torch, or fewer GPUs): a load failure, exit 1
    assert_clean_failure(runs["device_absent"], 1, "DEVICE=cuda:7")


# -- selfcheck and download ---------------------------------------------------------------


def test_selfcheck_prints_timings(runs, demo):
    text = ok(runs["selfcheck"])
    numbers = dict(re.findall(r"(\w+)=([0-9.]+)", text))
    for key in ("load_s", "ttft_s", "prompt_tokens", "completion_tokens", "decode_tok_s"):
        assert key in numbers, f"{key} missing from selfcheck output:\n{text}"
    assert 0 < float(numbers["load_s"]) < 120
    assert 0 < float(numbers["ttft_s"]) < 60
    assert 1 <= int(numbers["completion_tokens"]) <= int(MAX_TOKENS)
    assert int(numbers["prompt_tokens"]) > 1
    assert demo in text  # says which model it loaded
    assert "generic" in text  # ... and which interface


def test_selfcheck_on_the_demo_skips_the_known_answers_but_checks_the_loop(runs):
    lines = ok(runs["selfcheck"]).splitlines()
    assert "known-answer checks are skipped" in "\n".join(lines)
    cases = [line for line in lines if re.match(r"\[(PASS|FAIL|SKIP)\] (digits|colour|word)-", line)]
    assert len(cases) == 5 and all(line.startswith("[SKIP]") for line in cases), cases
    loop = [line for line in lines if "decode loop vs model.generate" in line]
    assert len(loop) == 2 and all(line.startswith("[PASS]") for line in loop), loop
    assert lines[-1] == "selfcheck: PASS"


def test_selfcheck_fails_random_weights_on_the_known_answers(runs):
    """Random weights read no digits: the known-answer test must say FAIL and exit 1."""
    done = runs["selfcheck_random_weights"]
    out = done.stdout.decode("utf-8")
    assert done.returncode == 1, out + done.stderr.decode(errors="replace")[-2000:]
    cases = [line for line in out.splitlines() if re.match(r"\[(PASS|FAIL)\] (digits|colour|word)-", line)]
    assert len(cases) == 5 and any(line.startswith("[FAIL]") for line in cases), cases
    assert sum("[PASS] decode loop vs model.generate" in line for line in out.splitlines()) == 2
    assert out.strip().splitlines()[-1] == "selfcheck: FAIL"


def test_download_local_complete_folder_prints_its_path(runs, demo):
    assert demo in ok(runs["download_local"])


def test_download_offline_missing_folder_fails_clearly(runs, files):
    line = assert_clean_failure(runs["download_missing"], 1, files["no_model"])
    assert "HF_HUB_OFFLINE" in line or "offline" in line


@local_only
def test_serve_demo_flag_serves_the_demo_model(demo):
    """The README's first command: `hcx-cli serve --demo` (the flag after the command)."""
    with LiveServer(None, env={"DEMO_MODEL_DIR": demo}, args=["--demo"], name="hcx-serve-demo") as srv:
        assert srv.health["demo"] is True and srv.health["model"] == "hcx-demo-tiny-random"
        assert "DEMO MODE" in srv.health["note"]
        resp = post(srv.url, SEED_ROUTE, {"prompt": "hi", "max_tokens": 4, "min_tokens": 4, "seed": 1})
        assert resp.status_code == 200 and isinstance(resp.json()["result"], str)
