"""``python -m handoff.demo``: the demo worker (see ``handoff._demo``)."""

from __future__ import annotations

from ._demo import main

if __name__ == "__main__":
    main()
