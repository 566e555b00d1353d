"""`ftcot teacher-sim`: a local OpenAI-compatible teacher for offline runs, tests and benchmarks.

It is NOT a language model, and says so in ``/v1/models``. The package keeps the server apart from
what it answers with:

* `sources`: replayed or simulated rationales and the OpenAI response shapes (no HTTP);
* `batches`: the Files and Batch API state (uploads, batches on a clock, output and error files);
* `stats`: the counters at ``/stats`` (requests, faults, answers per (prompt, sample), batch lines);
* `app`: the bare ASGI app (routes, fault injection, SSE);
* `server`: running it (thread, subprocess, `ftcot teacher-sim` with flags generated from
  `config.TeacherSimConfig`, the one declaration of its settings).
"""

from __future__ import annotations

from .server import add_arguments, main, running_sim, sim_endpoint_id, wait_ready
from .sources import MODEL_DESCRIPTION, SIM_MODEL

__all__ = ["MODEL_DESCRIPTION", "SIM_MODEL", "add_arguments", "main", "running_sim", "sim_endpoint_id", "wait_ready"]
