import os

# Tests run on the CPU; keep XLA from spreading one test over every core of a small machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
