"""The main job's gateway step: an FAQ bot's traffic through `modelcache
gateway`, sent by the official `openai` Python client as users send it.

    gateway_faq.py V1_BASE_URL V2_BASE_URL

V1_BASE_URL is a gateway serving model version v1, V2_BASE_URL one serving v2
(a rollout: the pods of v2 come up with their own gateways). Against v1 it
sends each question, then each again (exact hits, some streamed), then
paraphrases (semantic hits where the calibrated threshold allows). Against v2
it sends each question twice: the first time nothing of v1's may answer.
Prints one JSON report on stdout.
"""

import json
import statistics
import sys
import time

import openai

SYSTEM = "You are the HR assistant of ACME. Answer in one short sentence."
FAQ = [
    ("How many vacation days do new employees get?",
     ["How many days of vacation do new employees get?"]),
    ("How do I reset my password?",
     ["How can I reset my password?", "How do I reset my account password?"]),
    ("When is payday each month?", ["When is payday every month?"]),
    ("Can I work from home on Fridays?", ["Am I allowed to work from home on Fridays?"]),
    ("How do I submit an expense report?", ["How can I submit an expense report?"]),
    ("What is the parental leave policy?", ["What is the policy on parental leave?"]),
    ("Who do I contact for IT support?", ["Who should I contact for IT support?"]),
    ("How do I book a meeting room?", ["How can I book a meeting room?"]),
]


def ask(client, question, stream):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=32, stream=stream)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    return {
        "question": question,
        "stream": stream,
        "outcome": raw.headers.get("x-modelcache", ""),
        "similarity": raw.headers.get("x-modelcache-similarity"),
        "tokensSaved": int(raw.headers.get("x-modelcache-tokens-saved") or 0),
        "ms": (time.perf_counter() - started) * 1000,
        "text": text,
    }


def p50(values):
    return round(statistics.median(values), 1) if values else None


def main(v1_url, v2_url):
    key = "sk-acme-faq-bot"
    v1 = openai.OpenAI(base_url=v1_url + "/v1", api_key=key, max_retries=0)
    v2 = openai.OpenAI(base_url=v2_url + "/v1", api_key=key, max_retries=0)
    calls = []
    for i, (question, _) in enumerate(FAQ):
        calls.append(ask(v1, question, stream=i % 2 == 1))
    for i, (question, _) in enumerate(FAQ):
        calls.append(ask(v1, question, stream=i % 3 == 0))
    for i, (_, paraphrases) in enumerate(FAQ):
        for j, p in enumerate(paraphrases):
            calls.append(ask(v1, p, stream=(i + j) % 2 == 0))
    answers = {c["question"]: c["text"] for c in calls[: len(FAQ)]}
    served = [c for c in calls if c["outcome"] in ("hit", "semantic-hit", "coalesced")]
    upstream = [c for c in calls if c["outcome"] == "miss"]
    outcomes = {}
    for c in calls:
        outcomes[c["outcome"]] = outcomes.get(c["outcome"], 0) + 1
    # A hit returns the answer stored for the original question.
    wrong = [c["question"] for c in calls if c["outcome"] == "hit"
             and c["question"] in answers and c["text"] != answers[c["question"]]]

    after = [ask(v2, q, stream=False) for q, _ in FAQ]
    again = [ask(v2, q, stream=True) for q, _ in FAQ]
    report = {
        "requests": len(calls),
        "outcomes": outcomes,
        "hitRate": round(len(served) / len(calls), 3),
        "llmCalls": len(upstream),
        "llmCallsAvoided": len(served),
        "hitMsP50": p50([c["ms"] for c in served]),
        "missMsP50": p50([c["ms"] for c in upstream]),
        "streamedHits": sum(1 for c in served if c["stream"]),
        "semanticHits": [
            {"question": c["question"], "similarity": float(c["similarity"])}
            for c in calls if c["outcome"] == "semantic-hit"
        ],
        "tokensSaved": sum(c["tokensSaved"] for c in calls),
        "hitsWithAnotherAnswer": wrong,
        "afterRollout": {
            "requests": len(after),
            # v2 had no entries of its own yet: anything but a miss would
            # be v1's answer.
            "answeredFromV1": sum(1 for c in after if c["outcome"] != "miss"),
            "secondPassHits": sum(1 for c in again if c["outcome"] == "hit"),
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: gateway_faq.py V1_BASE_URL V2_BASE_URL")
    main(sys.argv[1], sys.argv[2])
