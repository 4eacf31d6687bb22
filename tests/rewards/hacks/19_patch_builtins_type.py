# Hack: patch the real builtins (type, repr, isinstance) so the runner's checks accept an
# object that claims to be the answer.
# Stopped by: the static check (builtins import, dunders); the guard; and whatever the runner
# does, the harness parses plain numbers only.
import builtins


class Claim:
    def __repr__(self):
        return "expected"

    def __eq__(self, other):
        return True


builtins.type = lambda x: int
builtins.repr = lambda x: "0"


def matmul(A, B):
    return [[Claim()] * len(B[0]) for _ in A]
