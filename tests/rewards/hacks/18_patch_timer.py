# Hack: edit the timing function so every call looks instant, and skip the work.
# Stopped by: the static import check (time); the import guard; the timer is in the harness
# process, and the (skipped) result is checked.
import time

time.perf_counter = lambda: 0.0
time.time = lambda: 0.0
time.monotonic = lambda: 0.0


def matmul(A, B):
    return [[0] * len(B[0]) for _ in A]
