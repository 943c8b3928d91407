"""A test hook that kills or interrupts the trainer at a chosen point, so that fault tests are exact.

    DS_MOE_DIV_FAULT="<point>@<step>[:rank<r>][:<action>]"   (several, comma-separated)

point: `step` (optimizer step <step> done, before logging and saving), `save` (while saving the tag of
<step>: DeepSpeed's files written, the trainer's not yet, `latest` not moved), `latest` (right after
`latest` moved to <step>'s tag). action: `kill` (SIGKILL this rank, the default), `kill-group` (SIGKILL
this rank's whole process group: launcher and every rank, as when a node dies), `int` (SIGINT to this
rank), `int-group` (SIGINT to the process group, as Ctrl-C in a terminal does).
Without the variable (every real run) `inject` does nothing.
"""
from __future__ import annotations

import os
import signal

ENV = "DS_MOE_DIV_FAULT"
POINTS = ("step", "save", "latest")
ACTIONS = {"kill": signal.SIGKILL, "kill-group": signal.SIGKILL, "int": signal.SIGINT, "int-group": signal.SIGINT}


def parse(spec: str) -> list[tuple[str, int, int | None, str]]:
    """[(point, step, rank or None, action)] of a DS_MOE_DIV_FAULT value; ValueError names a bad item."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, rest = item.partition("@")
        step, *options = rest.split(":")
        rank, action = None, "kill"
        for option in options:
            if option.startswith("rank") and option[4:].isdigit():
                rank = int(option[4:])
            elif option in ACTIONS:
                action = option
            else:
                raise ValueError(f"{ENV}: unknown option {option!r} in {item!r}")
        if point not in POINTS or not step.isdigit():
            raise ValueError(f"{ENV}: {item!r} must be <point>@<step>[:rank<r>][:<action>] with point in {POINTS}")
        faults.append((point, int(step), rank, action))
    return faults


def inject(point: str, *, step: int, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for where, at, only_rank, action in parse(spec):
        if where == point and at == step and only_rank in (None, rank):
            if action.endswith("-group"):
                os.killpg(os.getpgid(0), ACTIONS[action])
            else:
                os.kill(os.getpid(), ACTIONS[action])
