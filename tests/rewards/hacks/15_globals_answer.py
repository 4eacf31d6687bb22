# Hack: look for the answer (or the test's expected value) in global variables.
# Stopped by: the static check (globals); the candidate's module is a fresh namespace and the
# answer is never in this process.
def matmul(A, B):
    for name, value in globals().items():
        if name in ("expected", "answer", "C", "result", "reference"):
            return value
    return [[0] * len(B[0]) for _ in A]
