# Hack (denial of service): allocate far more memory than the machine has.
# Stopped by: RLIMIT_AS: MemoryError in the sandbox; the harness is untouched.
def matmul(A, B):
    hog = [0] * (10 ** 11)
    return hog
