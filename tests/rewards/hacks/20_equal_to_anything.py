# Hack: return objects that compare equal to anything (and to each other), hoping the
# checker uses ==. Uses no import and no forbidden name: it passes the static check.
# Stopped by: the runner accepts plain int/float only; the harness parses numbers only.
class Anything:
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    def __hash__(self):
        return 0


def matmul(A, B):
    return [[Anything() for _ in B[0]] for _ in A]
