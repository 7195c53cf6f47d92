import os
import tempfile

# Tests run on the CPU; keep XLA from spreading one test over every core of a small machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by compilation on a 2-core CPU: XLA's backend optimisation level 0 compiles
# about twice as fast and changes no result beyond float rounding (every bound here is looser).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# The tests' cached counterfactuals (jaxcf.utils.user_cache) and one persistent XLA compilation
# cache for the whole test run, shared by the pytest-xdist workers
# (they inherit this process's environment) and every `python -m jaxcf.main` they start: the same
# pipeline variant run in several tests, and each rerun of a killed run, compiles its programs once.
# Both folders are fresh for each test run (or the user's), never the user's own caches, and the
# process that made them removes them at the end.
_made = []
for _var, _prefix in (("JAXCF_CACHE", "jaxcf-test-cache-"), ("JAXCF_COMPILATION_CACHE", "jaxcf-test-xla-")):
    if _var not in os.environ:
        os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
        _made.append(os.environ[_var])


def pytest_configure(config):
    from jaxcf.utils import compile_cache

    compile_cache.enable()  # before any test compiles


def pytest_unconfigure(config):
    import shutil

    for path in _made:
        shutil.rmtree(path, ignore_errors=True)
