"""ConAdv's overlap: the share of the attack's time hidden behind the update on a second CUDA stream
(``side_stream="on"``), ``(attack alone + update alone - ConAdv step) / attack alone``, all three
measured side by side (in sequence on the CPU: no overlap expected). A negative overlap is why
``side_stream="auto"`` keeps a one-rank run in sequence."""
from __future__ import annotations

from dat_ds import attacks

from .harness import METHODS, Bench, Clock, Plan, dat_ds_run, interleaved


def conadv_overlap(b: Bench, plan: Plan, clock: Clock) -> dict:
    """ConAdv's training step against its two parts run alone: the attack (``launch`` +
    ``collect`` of a separate instance: snapshot and PGD, nothing beside it) and a natural update."""
    kw = dict(next(kw for _, name, kw in METHODS if name == "conadv"))
    alone = attacks.create("conadv", **kw)
    kw["side_stream"] = "on"  # what the second stream does (auto keeps one rank in sequence)

    def attack_alone(n):
        with b.autocast():
            for _ in range(n):
                alone.collect(alone.launch(b.engine.module, b.x, b.y))
    runs = {"conadv": dat_ds_run(b, attacks.create("conadv", **kw), label="overlap-conadv"),
            "update": dat_ds_run(b, attacks.create("none"), label="overlap-update"), "attack": attack_alone}
    s = interleaved(clock, runs, plan, plan.overlap_steps)
    hidden = s["attack"] + s["update"] - s["conadv"]
    return {"attack_s": s["attack"], "update_s": s["update"], "conadv_s": s["conadv"], "hidden_s": hidden,
            "overlap": hidden / s["attack"], "side_stream": clock.cuda}

