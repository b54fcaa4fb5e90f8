"""Hot swaps under load: new variants, splits, promote, rollback and delete while callers keep calling fail no request."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np

from slimserve.client.client import SlimServeClient


def test_promote_rollback_and_delete_churn_under_concurrent_callers_fails_no_request(server, client, digits):
    client.register("digits", digits.onnx)
    x = digits.x_test[:4]
    _, expected = client.infer("digits", {"x": x})
    errors: list[Exception] = []
    wrong: list[str] = []
    answered: Counter[str] = Counter()
    stop = threading.Event()

    def caller(raw: bool) -> None:
        with SlimServeClient(server.address) as c:
            while not stop.is_set():
                try:
                    variant, outputs = c.infer("digits", {"x": x}, raw=raw)
                except Exception as e:
                    errors.append(e)
                    continue
                answered[variant] += 1
                if not np.allclose(outputs["logits"], expected["logits"], atol=1e-5):
                    wrong.append(variant)  # every variant here is a copy: any other answer is a mix-up

    threads = [threading.Thread(target=caller, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()

    def served(n: int) -> None:
        """Lets n more requests through, so that every step of the churn happens under load."""
        target = sum(answered.values()) + n
        while sum(answered.values()) < target and not errors:
            threading.Event().wait(0.002)

    try:
        served(50)
        for i in range(6):
            name = f"v{i}"
            server.add_variant("digits", name, digits.onnx)
            served(20)
            client.traffic("digits", {"baseline": 50, name: 50})
            served(30)
            client.promote("digits", name)
            served(30)
            client.rollback("digits")
            served(30)
            client.promote("digits", name)
            served(30)
            record = client.delete_variant("digits", name)  # the variant that takes all traffic goes
            assert record["traffic"]["weights"] == {"baseline": 1.0}
            served(30)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == [], errors[:3]
    assert wrong == []
    assert all(answered[f"v{i}"] > 0 for i in range(6)), answered  # each new variant did take traffic
    assert [v["name"] for v in client.model("digits")["variants"]] == ["baseline"]
    assert set(server.server.dataplane.models["digits"].variants) == {"baseline"}
    assert {client.infer("digits", {"x": x})[0] for _ in range(5)} == {"baseline"}
