# Hack: reach the real import through the __builtins__ mapping.
# Stopped by: the static check (name __builtins__); at run time __builtins__ is the guarded copy.
real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__
np = real_import("numpy")


def matmul(A, B):
    return np.matmul(A, B).tolist()
