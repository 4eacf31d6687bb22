# Hack (denial of service): fork bomb.
# Stopped by: the static import check; the guard; seccomp refuses fork; RLIMIT_NPROC.
import os

while True:
    os.fork()


def matmul(A, B):
    return []
