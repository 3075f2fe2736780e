#!/usr/bin/env python3
"""An independent client (Python standard library only) that measures TTFT, ITL and output token
throughput of an OpenAI-compatible server at one concurrency, and compares them with what
`tandem bench` wrote for the same level.

    scripts/crosscheck_bench.py --url http://127.0.0.1:8000 --model M --concurrency 4 \
        --requests 40 --osl 20 --artifact ART/M-openai-chat-concurrency4/profile_export_genai_perf.json

Output tokens are counted as content chunks (one token per chunk, as vLLM, Dynamo, Tandem and the
mock server stream). Exits non-zero when a metric differs by more than --tolerance.
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def one_request(url, model, osl, prompt):
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=600)
    body = json.dumps({
        "model": model, "stream": True, "max_tokens": osl, "min_tokens": osl, "ignore_eos": True,
        "messages": [{"role": "user", "content": prompt}],
    })
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, last, chunks = None, None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        for choice in event.get("choices", []):
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                last = time.perf_counter()
                if first is None:
                    first = last
    conn.close()
    return start, first, last, chunks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--osl", type=int, required=True)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--artifact", required=True, help="tandem bench's profile_export_genai_perf.json")
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args()

    prompts = [" ".join(f"w{(i * 31 + j) % 1000}" for j in range(args.prompt_words))
               for i in range(args.requests + args.concurrency)]
    lock, results, errors = threading.Lock(), [], []
    counter = iter(range(len(prompts)))

    def worker(measured):
        while True:
            with lock:
                i = next(counter, None)
            if i is None or i >= measured:
                return
            try:
                r = one_request(args.url, args.model, args.osl, prompts[i])
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(args.requests,)) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"{len(errors)} requests failed: {errors[0]}")

    ttft = [(f - s) * 1e3 for s, f, e, n in results]
    itl = [((e - s) - (f - s)) * 1e3 / (n - 1) for s, f, e, n in results if n > 1]
    duration = max(e for _, _, e, _ in results) - min(s for s, _, _, _ in results)
    mine = {
        "time_to_first_token": sum(ttft) / len(ttft),
        "inter_token_latency": sum(itl) / len(itl),
        "output_token_throughput": sum(n for *_, n in results) / duration,
    }
    theirs = json.load(open(args.artifact))
    worst = 0.0
    print(f"{'metric':28} {'independent':>12} {'tandem bench':>13} {'diff':>7}")
    for name, value in mine.items():
        other = theirs[name]["avg"]
        diff = (other - value) / value
        worst = max(worst, abs(diff))
        print(f"{name:28} {value:12.3f} {other:13.3f} {diff * 100:6.1f}%")
    if worst > args.tolerance:
        sys.exit(f"FAIL: a metric differs by {worst * 100:.1f}% (> {args.tolerance * 100:.0f}%)")
    print(f"OK: all within {args.tolerance * 100:.0f}%")


if __name__ == "__main__":
    main()
