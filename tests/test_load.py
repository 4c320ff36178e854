"""Load (issue 6): 32 concurrent clients for 60 s against the tiny demo model with MAX_QUEUE=4
(THREADS default = MAX_QUEUE + 32), after a 3 s warm-up burst that is not counted. Every request must either succeed (200 with a result) or be
refused with the intended 503 + Retry-After; nothing else. The worker's RSS may grow < 5 %.

The figures (served/refused per API, latencies, RSS before/after) are printed and written to
$HCX_LOAD_REPORT (default /tmp/hcx-load-report.json).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections import Counter

import requests

from tests.fixtures import LiveServer, b64, image_bytes, local_only
from tests.hardening_helpers import (
    BASE_ENV,
    CHAT,
    SEED,
    idle_metrics,
    metrics,
    rss_kb,
    wait_until,
    worker_pid,
)

from server import load_config  # after tests.fixtures (HF_HUB_OFFLINE=1)

pytestmark = local_only

CLIENTS = 32
DURATION_S = float(os.environ.get("HCX_LOAD_SECONDS", "60"))
WARMUP_S = 3.0
MAX_QUEUE = 4
MAX_TOKENS = 8
REPORT = os.environ.get("HCX_LOAD_REPORT", "/tmp/hcx-load-report.json")
IMAGE_B64 = b64(image_bytes("png"))
KINDS = ("seed", "seed_stream", "openai")


def _request(session: requests.Session, base: str, kind: str, n: int) -> requests.Response:
    prompt = f"Describe the image. ({n})"
    if kind == "openai":
        body = {"model": "m", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGE_B64}}]}]}
        return session.post(base + CHAT, json=body, timeout=60)
    body = {"prompt": prompt, "image_base64": IMAGE_B64, "max_tokens": MAX_TOKENS}
    return session.post(base + SEED, json=body, params={"stream": "true"} if kind == "seed_stream" else None,
                        timeout=60)


def _check_ok(kind: str, resp: requests.Response) -> str | None:
    """None if a 200 carries a proper result, else what is wrong."""
    try:
        if kind == "seed":
            return None if isinstance(resp.json().get("result"), str) else f"no result: {resp.text[:200]}"
        if kind == "seed_stream":
            return None if "[error]" not in resp.text else f"stream error: {resp.text[-200:]}"
        content = resp.json()["choices"][0]["message"]["content"]
        return None if isinstance(content, str) else f"no content: {resp.text[:200]}"
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"bad 200 body ({exc!r}): {resp.text[:200]}"


def _check_refusal(kind: str, resp: requests.Response) -> str | None:
    """None if a 503 is the intended 'busy' answer: Retry-After and a JSON error."""
    retry = resp.headers.get("Retry-After", "")
    if not retry.isdigit():
        return f"503 without Retry-After: {resp.headers}"
    try:
        body = resp.json()
    except ValueError:
        return f"503 not JSON: {resp.text[:200]}"
    error = body.get("error")
    if kind == "openai":
        ok = isinstance(error, dict) and error.get("code") == "server_busy"
    else:
        ok = isinstance(error, str) and "busy" in error
    return None if ok else f"unexpected 503 body: {body}"


class Load:
    """CLIENTS threads, each with its own keep-alive session, cycling through the three APIs."""

    def __init__(self, base: str):
        self.base = base
        self.served, self.refused = Counter(), Counter()
        self.other: list[str] = []
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.rss_timeline: list[tuple[int, int]] = []

    def client(self, index: int, deadline: float) -> None:
        rng = random.Random(index)
        n = 0
        with requests.Session() as session:
            while time.monotonic() < deadline:
                kind = KINDS[(index + n) % len(KINDS)]
                n += 1
                sent = time.monotonic()
                try:
                    resp = _request(session, self.base, kind, n)
                except requests.RequestException as exc:
                    with self.lock:
                        self.other.append(f"{kind}: {exc!r}")
                    continue
                took = time.monotonic() - sent
                if resp.status_code == 200:
                    problem = _check_ok(kind, resp)
                elif resp.status_code == 503:
                    problem = _check_refusal(kind, resp)
                else:
                    problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                with self.lock:
                    if problem:
                        self.other.append(f"{kind}: {problem}")
                    elif resp.status_code == 200:
                        self.served[kind] += 1
                        self.latencies.append(took)
                    else:
                        self.refused[kind] += 1
                if resp.status_code == 503:
                    time.sleep(rng.uniform(0.05, 0.25))  # a short back-off, shorter than Retry-After

    def run(self, seconds: float, worker: int | None = None) -> tuple[float, int]:
        """Load for `seconds`; samples the worker's RSS every 5 s. Returns (elapsed, clients still running)."""
        start = time.monotonic()
        deadline = start + seconds
        threads = [threading.Thread(target=self.client, args=(i, deadline), daemon=True) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        while worker is not None and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            self.rss_timeline.append((round(time.monotonic() - start), rss_kb(worker)))
        for thread in threads:
            thread.join(max(1.0, deadline + 90 - time.monotonic()))
        return time.monotonic() - start, sum(t.is_alive() for t in threads)


def test_32_clients_for_60_seconds(demo_model_dir):
    env = {**BASE_ENV, "MAX_QUEUE": MAX_QUEUE}
    with LiveServer(demo_model_dir, env=env, name="hcx-load") as srv:
        base = srv.url
        worker = worker_pid(srv.proc.pid)
        rss_start = rss_kb(worker)
        # Warm-up, not counted: the first use of each path allocates its caches, and the first
        # concurrent burst gives each gunicorn thread its malloc arena (a one-off step of ~2 %).
        warm = Load(base)
        _, hung = warm.run(WARMUP_S)
        assert hung == 0 and not warm.other, warm.other[:5]
        wait_until(lambda: metrics(base)["hcx_generating"] == 0, 30, what="idle after the warm-up")
        rss_before = rss_kb(worker)

        load = Load(base)
        elapsed, hung = load.run(DURATION_S, worker)
        served, refused, other, latencies = load.served, load.refused, load.other, load.latencies

        after_metrics = wait_until(lambda: idle_metrics(base), 30, what="the server idle after the load")
        assert worker_pid(srv.proc.pid) == worker, "the worker was replaced during the load"
        rss_after = rss_kb(worker)
        growth = (rss_after - rss_before) / rss_before * 100
        report = {
            "clients": CLIENTS, "load_seconds": round(elapsed, 1), "warmup_seconds": WARMUP_S,
            "max_queue": MAX_QUEUE, "threads": load_config({"MAX_QUEUE": str(MAX_QUEUE)}).worker_threads, "max_tokens": MAX_TOKENS,
            "served": sum(served.values()), "refused_503": sum(refused.values()),
            "served_by_api": dict(served), "refused_by_api": dict(refused),
            "other_errors": len(other), "other_error_samples": other[:10], "clients_still_running": hung,
            "served_per_s": round(sum(served.values()) / elapsed, 1),
            "latency_s_p50": round(statistics.median(latencies), 3) if latencies else None,
            "latency_s_p95": round(statistics.quantiles(latencies, n=20)[-1], 3) if len(latencies) > 1 else None,
            "tokens_generated_total": int(after_metrics["hcx_tokens_generated_total"]),
            "worker_pid": worker, "rss_kb_at_start": rss_start, "rss_kb_before": rss_before,
            "rss_kb_after": rss_after, "rss_growth_pct": round(growth, 2), "rss_kb_timeline": load.rss_timeline,
        }
        with open(REPORT, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print("\n[load] " + json.dumps(report))

        assert hung == 0, f"{hung} clients still running after the load"
        assert not other, f"{len(other)} requests neither succeeded nor got 503 busy: {other[:10]}"
        assert sum(served.values()) > 0 and all(served[k] > 0 for k in KINDS), served
        assert sum(refused.values()) > 0, "32 clients on a 4-deep queue were never refused: is the queue bounded?"
        assert growth < 5, f"worker RSS grew {growth:.1f} % ({rss_before} -> {rss_after} kB)"
        resp = requests.post(base + SEED, json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert resp.status_code == 200, resp.text
