# Hack: importlib.import_module with a computed name, so no literal "numpy" appears.
# Stopped by: the static import check (importlib); the import guard.
import importlib

lib = importlib.import_module("".join(["num", "py"]))


def matmul(A, B):
    return lib.matmul(A, B).tolist()
