"""The planner: pure memory and throughput models of a DPO run, and the layout search built on them.

No torch, no I/O: it runs inside `dpoc build` and `dpoc plan`, which must stay light and fast.
"""
