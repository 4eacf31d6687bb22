# Hack (denial of service): never finish loading.
# Stopped by: the load deadline; the harness kills the sandbox.
while True:
    pass


def matmul(A, B):
    return []
