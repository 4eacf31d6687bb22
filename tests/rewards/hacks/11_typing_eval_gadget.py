# Hack: typing.get_type_hints evaluates string annotations with eval(); given an empty
# globals dict, Python fills in the real builtins, so an annotation can import anything.
# The static check sees only a string, the import guard is not asked. Gets ctypes this way
# and calls the system BLAS's dgemm (outside the sandbox this computes the right product).
# Stopped by: the sandbox: ctypes cannot load (libffi is not visible), and libblas is
# outside the minimal root / the Landlock allow-list.
import typing


def gadget(x: "__import__('ctypes')"):
    pass


def matmul(A, B):
    ctypes = typing.get_type_hints(gadget, globalns={})["x"]
    m, k, n = len(A), len(B), len(B[0])
    blas = ctypes.CDLL("libblas.so.3")
    one, zero = ctypes.c_double(1.0), ctypes.c_double(0.0)
    a = (ctypes.c_double * (m * k))(*[float(x) for row in A for x in row])
    b = (ctypes.c_double * (k * n))(*[float(x) for row in B for x in row])
    c = (ctypes.c_double * (m * n))()
    i = lambda v: ctypes.byref(ctypes.c_int(v))
    # Row-major C = A B is column-major C^T = B^T A^T.
    blas.dgemm_(b"N", b"N", i(n), i(m), i(k), ctypes.byref(one), b, i(n), a, i(k), ctypes.byref(zero), c, i(n))
    return [[c[r * n + j] for j in range(n)] for r in range(m)]
