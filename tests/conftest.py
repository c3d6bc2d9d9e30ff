import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before any kernel module is imported: @triton.jit reads it when it wraps the function.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic example search, so that CI runs the same examples every time; no deadline, since
# the token recurrences are slow by design.
settings.register_profile(
    "linattn",
    derandomize=True,
    deadline=None,
    max_examples=20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "linattn"))
