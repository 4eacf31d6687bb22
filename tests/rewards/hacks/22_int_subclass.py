# Hack: an int subclass whose == is always true and whose repr looks like a number.
# Stopped by: the runner accepts exactly int and float (no subclasses); wrong numbers fail.
class Num(int):
    def __eq__(self, other):
        return True

    def __hash__(self):
        return 0


def matmul(A, B):
    return [[Num(0) for _ in B[0]] for _ in A]
