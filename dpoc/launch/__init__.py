"""`dpoc launch`: run a build's node scripts here, over ssh or on Ray, supervise them, stop or restart the job.

The build says what runs (node scripts, plan.json); the executors here say where: `local` (every node on this
machine), `ssh` (each node on its host), `ray` (one actor per node in a placement group). `job` holds what they
share: the job read from the build, supervising the nodes, stopping them all when one fails, restarting.
Nothing here is imported by `dpoc build`; Ray only by the Ray executor.
"""
