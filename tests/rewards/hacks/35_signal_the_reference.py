# Hack: slow the reference solution down (SIGSTOP it) or kill the harness, so the candidate
# looks faster or the failure goes unseen.
# Stopped by: the static import check; the guard; seccomp refuses kill(); its own pid namespace.
import os
import signal


def matmul(A, B):
    os.kill(-1, signal.SIGSTOP)
    os.kill(os.getppid(), signal.SIGKILL)
    return [[0] * len(B[0]) for _ in A]
