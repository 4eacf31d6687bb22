# Hack: caching. Compute once per shape and return the stored result whenever the shape
# repeats, as a benchmark that reuses its inputs would reward.
# Stopped by: fresh inputs for every product, and a repeated shape among the hidden cases.
_cache = {}


def matmul(A, B):
    key = (len(A), len(B), len(B[0]))
    if key not in _cache:
        _cache[key] = [[sum(a * b for a, b in zip(row, col)) for col in zip(*B)] for row in A]
    return _cache[key]
