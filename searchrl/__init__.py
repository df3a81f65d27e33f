"""searchrl: train LLMs to recall what they know, search what they don't, and memorize what they found."""

import os

# OpenMP worker threads that spin while waiting for work starve each other (and every other process)
# on a busy CPU: on the shared 2-core machine, SmolLM2-135M generated 10x slower (a tiny test model
# 40x slower) with the default policy. Passive waiting costs nothing measurable on an idle machine.
# Set here, before anything imports torch; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
