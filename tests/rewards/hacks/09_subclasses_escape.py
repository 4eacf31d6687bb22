# Hack: the classic escape: walk object.__subclasses__() to a class defined in a module that
# imported sys, take sys from its function's __globals__, and import numpy through it.
# Stopped by: the static check (dunder attributes); numpy is not visible in the sandbox.
def find_sys():
    for cls in ().__class__.__base__.__subclasses__():
        init = cls.__init__
        if hasattr(init, "__globals__") and "sys" in init.__globals__:
            return init.__globals__["sys"]
    raise RuntimeError("no sys found")


sys = find_sys()
np = sys.modules["importlib"].import_module("numpy")


def matmul(A, B):
    return np.matmul(A, B).tolist()
