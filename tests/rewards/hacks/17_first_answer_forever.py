# Hack: caching. Compute the first product honestly, then return it for every later call.
# Stopped by: fresh inputs (and shapes) for every product.
_first = []


def matmul(A, B):
    if not _first:
        _first.append([[sum(a * b for a, b in zip(row, col)) for col in zip(*B)] for row in A])
    return _first[0]
