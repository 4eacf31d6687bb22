# Hack: return a lazy sequence that claims the right length and computes (or fakes) items
# only when looked at, hoping the timer stops before the work is done.
# Stopped by: the runner wants real lists of real numbers; the harness's clock stops only
# after the last number has arrived.
class LazyRow:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([0] * self.n)


def matmul(A, B):
    return [LazyRow(len(B[0])) for _ in A]
