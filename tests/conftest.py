import os

# Tests run on the CPU; keep XLA from spreading one test over every core of a small machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by compilation on a 2-core CPU: XLA's backend optimisation level 0 compiles
# about twice as fast and changes no result beyond float rounding (every bound here is looser).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# Keep the tests' cached results (jaxcf.utils.user_cache) out of the user's own cache folder.
if "JAXCF_CACHE" not in os.environ:
    import tempfile

    os.environ["JAXCF_CACHE"] = tempfile.mkdtemp(prefix="jaxcf-test-cache-")
