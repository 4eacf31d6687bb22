# Hack: random keeps os as random._os; use it to run a faster program.
# Stopped by: the static check (private attribute); the views have no private names; no fork.
import random


def matmul(A, B):
    return eval(random._os.popen("python3 -c 'print([[0]])'").read())
