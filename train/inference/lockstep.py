"""Serving on several processes (one per host): process 0 takes the HTTP requests and
plans each engine step; the plan (requests cancelled, requests admitted with their
prompts and settings) goes to every other process through jax.distributed's key-value
store, and each runs the same compiled step on its devices. Everything else an engine
step changes follows from the step's tokens, which every process reads (replicated).
"""

from __future__ import annotations

import dataclasses
import json

from train.inference.engine import Plan, Request, Sampling

KEY = "shardlm/serve/plan/"
KEEP = 1000  # plans kept in the store (a follower is never that many behind)
WAIT_MS = 1000


class Peers:
    """Process 0 `send`s each step's plan; the others `receive` them in order."""

    def __init__(self, client, leader: bool):
        self.client, self.leader, self.n = client, leader, 0

    @classmethod
    def of_this_run(cls) -> "Peers | None":
        """Peers when jax.distributed joined several processes, else None."""
        import jax
        if jax.process_count() == 1:
            return None
        from jax._src import distributed
        return cls(distributed.global_state.client, jax.process_index() == 0)

    def send(self, plan: Plan) -> None:
        self.client.key_value_set(f"{KEY}{self.n}", json.dumps(encode(plan)))
        if self.n >= KEEP:
            self.client.key_value_delete(f"{KEY}{self.n - KEEP}")
        self.n += 1

    def receive(self) -> Plan | None:
        """The next plan, or None when none came within a second (the server is idle)."""
        try:
            text = self.client.blocking_key_value_get(f"{KEY}{self.n}", WAIT_MS)
        except Exception as e:  # noqa: BLE001 - jaxlib's error type for a deadline
            if "DEADLINE" in str(e).upper() or "timed out" in str(e).lower():
                return None
            raise
        self.n += 1
        return decode(json.loads(text))


def encode(plan: Plan) -> dict:
    return {"cancel": plan.cancel, "stop": plan.stop,
            "admit": [[b, r.id, r.prompt, dataclasses.astuple(r.sampling),
                       sorted(r.stop_ids)] for b, r in plan.admit]}


def decode(data: dict) -> Plan:
    admit = []
    for b, rid, prompt, sampling, stop_ids in data["admit"]:
        request = Request(prompt, Sampling(*sampling), stop_ids=frozenset(stop_ids))
        request.id = rid
        admit.append((b, request))
    return Plan(data["cancel"], admit, data["stop"])
