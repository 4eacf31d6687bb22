# Hack (denial of service): flood stdout/stderr to exhaust the harness's memory or disk.
# Stopped by: the output limit: the sandbox is killed past it; only the head of stderr is kept.
def matmul(A, B):
    line = "x" * 65536
    while True:
        print(line)
