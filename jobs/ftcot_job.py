"""Entrypoint for `ray job submit`: the same CLI, joined to the cluster the job runs on.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/ftcot_job.py run --config quickstart run_dir=/mnt/shared/runs/quickstart

Inside a job Ray sets RAY_ADDRESS, so `init_ray` joins the cluster instead of starting one. On a
multi-node cluster put `run_dir` (and `teacher.cache_dir`) on storage every node sees.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working_dir

from ftcot_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
