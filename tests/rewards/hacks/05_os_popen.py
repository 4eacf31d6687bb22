# Hack: shell out with os.popen / os.system to a faster program.
# Stopped by: the static import check; the import guard; no fork, no shell in the sandbox.
import os


def matmul(A, B):
    with os.popen("python3 -c 'import numpy'") as pipe:
        pipe.read()
    return eval(os.popen("echo " + repr(str([[0]])).replace(" ", "")).read())
