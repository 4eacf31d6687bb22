# Hack (denial of service): never return from the call.
# Stopped by: the per-product deadline; the harness kills the sandbox.
def matmul(A, B):
    while True:
        pass
