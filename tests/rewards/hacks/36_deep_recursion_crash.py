# Hack (denial of service): crash the interpreter with unbounded recursion (after lifting the
# recursion limit), hoping a crash is scored as "no failure".
# Stopped by: the static import check; the guard; a crash is a failure; the harness survives.
import sys

sys.setrecursionlimit(10 ** 9)


def down(n):
    return down(n + 1) + 1


def matmul(A, B):
    return down(0)
