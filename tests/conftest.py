import os

from hypothesis import HealthCheck, settings

# Deterministic example search, so that CI runs the same examples every time; no deadline, since
# the token recurrences are slow by design.
settings.register_profile(
    "linattn", derandomize=True, deadline=None, max_examples=20, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "linattn"))
